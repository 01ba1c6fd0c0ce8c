"""The native checkpoint format: an HF-style folder that holds any upcycle model.

- `config.json`: `model_type: "upcycle"`, the whole `ModelConfig` under the key `upcycle` (the
  source of truth), plus the common HF keys (vocab_size, hidden_size, ...) for tools that read them;
- `model.safetensors` or `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`, with
  dense tensors under HF Llama names and experts as stacked tensors;
- tokenizer files copied from the source, and a model card `README.md`.

Writing goes through `atomic_output_dir`: the folder appears complete or not at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from upcycle.checkpoint.architectures import hf_common_config
from upcycle.checkpoint.atomic import atomic_output_dir
from upcycle.checkpoint.safetensors_io import save_tensors
from upcycle.model.config import ModelConfig

NATIVE_MODEL_TYPE = "upcycle"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
DEFAULT_SHARD_BYTES = 2 * 1024**3


def native_config_dict(config: ModelConfig) -> dict[str, Any]:
    common = hf_common_config(config)
    common["tie_word_embeddings"] = False  # tying is handled by our model; HF must not re-tie
    return {
        "model_type": NATIVE_MODEL_TYPE,
        "architectures": ["UpcycleForCausalLM"],
        **common,
        "upcycle": config.model_dump(mode="json"),
    }


def write_config(folder: Path, config: ModelConfig) -> None:
    (folder / "config.json").write_text(
        json.dumps(native_config_dict(config), indent=2, sort_keys=True) + "\n"
    )


def copy_tokenizer_files(source: Path | None, folder: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in `source`."""
    if source is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    return copied


def write_model_card(folder: Path, title: str, body: str) -> None:
    (folder / "README.md").write_text(f"# {title}\n\n{body.strip()}\n")


def default_model_card(config: ModelConfig) -> str:
    return (
        f"An upcycle native checkpoint ({config.architecture} layout, {config.num_hidden_layers} layers, "
        f"hidden size {config.hidden_size}).\n\n"
        "Load it with:\n\n```python\nimport upcycle\nmodel = upcycle.load_model(PATH)\n```\n\n"
        "or, after `import upcycle`, with `transformers.AutoModelForCausalLM.from_pretrained(PATH)`.\n"
    )


def save_native(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    tokenizer_from: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    model_card: str | None = None,
) -> Path:
    """Save a `Transformer` as a native checkpoint folder, atomically."""
    config: ModelConfig = model.config
    state = {
        name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().cpu()
        for name, t in model.state_dict().items()
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        save_tensors(staging, state, max_shard_bytes)
        write_config(staging, config)
        copy_tokenizer_files(Path(tokenizer_from) if tokenizer_from else None, staging)
        write_model_card(staging, "upcycle model", model_card or default_model_card(config))
    return Path(out_dir)
