"""upcycle: turn dense language models into Mixture-of-Experts models, and train them.

`import upcycle` registers the native checkpoint format with transformers' Auto classes (at once
if transformers is loaded, else as soon as it is imported; see `upcycle/_hf_hook.py`).
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # Large CPU tensors on transparent huge pages: a conversion touches gigabytes of fresh
    # memory, and 2 MB pages cut its page faults ~15x (bench/RESULTS.md, conversion). PyTorch
    # reads this once, at its first allocation, so it only takes effect before torch is
    # imported; set THP_MEM_ALLOC_ENABLE=0 to opt out.
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from upcycle import _hf_hook
from upcycle.checkpoint import load_config, load_model, save_native
from upcycle.conversion import convert
from upcycle.errors import UpcycleError
from upcycle.model import ModelConfig, Transformer

_hf_hook.install()

__all__ = [
    "ModelConfig",
    "Transformer",
    "UpcycleError",
    "__version__",
    "convert",
    "load_config",
    "load_model",
    "save_native",
]
