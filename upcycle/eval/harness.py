"""lm-eval-harness on upcycle checkpoints, through its Hugging Face backend.

HF exports (Mixtral, Qwen2-MoE, Qwen3-MoE) load in lm-eval as they are. Native checkpoints (BAM,
and anything else no HF class holds) load once upcycle has registered its format with
transformers' Auto classes, which `import upcycle` does. So:

- in Python: `hf_lm(path)` returns an `lm_eval.models.huggingface.HFLM` for any checkpoint
  folder, to pass to `lm_eval.simple_evaluate(model=...)`;
- on the command line: `python -m upcycle.eval.harness run --model hf --model_args
  pretrained=PATH --tasks ...` is lm-eval's own CLI with upcycle registered first (plain
  `lm_eval` does not import upcycle, so it cannot read a native folder).

The checkpoint folder needs tokenizer files (tokenizer.json + tokenizer_config.json); `upcycle
convert` copies them from the sources.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import upcycle  # noqa: F401  (registers the native format with transformers)
from upcycle.errors import UpcycleError


def hf_lm(path: str | Path, device: str = "cpu", batch_size: int = 1, dtype: str = "float32", **kwargs: Any):
    """lm-eval's HF model wrapper around a native or HF checkpoint folder (decoder-only)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise UpcycleError(f"lm-eval-harness is not installed ({error}); pip install 'lm-eval[hf]'") from None
    return HFLM(
        pretrained=str(path), backend="causal", device=device, batch_size=batch_size, dtype=dtype, **kwargs
    )


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line, with upcycle's native format registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
