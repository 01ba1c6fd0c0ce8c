"""upcycle: turn dense language models into Mixture-of-Experts models, and train them.

`import upcycle` registers the native checkpoint format with transformers' Auto classes (at once
if transformers is loaded, else as soon as it is imported; see `upcycle/_hf_hook.py`).
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# Large CPU tensors on transparent huge pages: a conversion touches gigabytes of fresh memory,
# and 2 MB pages cut its page faults ~15x (bench/RESULTS.md, conversion). PyTorch reads the
# variable once, at its first CPU allocation, so it only takes effect before torch is imported;
# set THP_MEM_ALLOC_ENABLE=0 to opt out. It is removed again once read, so that processes this
# one starts (training workers) keep torch's default.
if "torch" not in _sys.modules and "THP_MEM_ALLOC_ENABLE" not in _os.environ:
    _os.environ["THP_MEM_ALLOC_ENABLE"] = _THP_SET_HERE = "1"
else:
    _THP_SET_HERE = ""

from upcycle import _hf_hook
from upcycle.checkpoint import load_config, load_model, save_native
from upcycle.conversion import convert
from upcycle.errors import UpcycleError
from upcycle.model import ModelConfig, Transformer

_hf_hook.install()

if _THP_SET_HERE:
    import torch as _torch

    _torch.empty(1)  # torch's first CPU allocation reads the variable (if import did not already)
    _os.environ.pop("THP_MEM_ALLOC_ENABLE", None)

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
