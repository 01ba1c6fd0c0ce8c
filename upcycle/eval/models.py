"""What evaluation can score, and how it is loaded: native and HF checkpoints, BTM ensembles.

An *evaluable model* is any `nn.Module` whose call `model(input_ids_BS)` returns an object with
`.logits` [B, S, V] (unnormalised or already log-probabilities: scores go through `log_softmax`
either way). Our `Transformer`, a transformers `PreTrainedModel` and `BTMEnsemble` all qualify,
so every evaluation in this package takes all three.

`load_evaluable(path)` opens a folder as one: a BTM folder (it holds `btm.json`) becomes a
`BTMEnsemble`, anything else goes through `upcycle.load_model` (native, HF dense, HF MoE).

Precision (`default_dtype`, `forward_precision`): on CPU the weights are loaded in fp32 and the
forward runs in fp32; on CUDA the weights keep the checkpoint's dtype and the forward runs under
bf16 autocast. Losses are always computed from fp32 log-probabilities.

Shape letters: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from upcycle.errors import UpcycleError

if TYPE_CHECKING:
    from upcycle.data import Manifest

BTM_FILE = "btm.json"
Evaluable = nn.Module
ModelSpec = nn.Module | str | Path


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto`/None picks CUDA when available, else CPU; an explicit CUDA request must be possible."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UpcycleError(f"device {device} was asked for but CUDA is not available; use --device cpu")
    return resolved


@contextlib.contextmanager
def forward_precision(device: torch.device, precision: str = "auto") -> Iterator[None]:
    """bf16 autocast on CUDA (`auto` or `bf16`), plain fp32 otherwise (`auto` on CPU, or `fp32`)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise UpcycleError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        yield


def default_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """fp32 on CPU (bf16 matmuls there are slow and lossy) or when fp32 is asked for; else the
    checkpoint's own dtype (CUDA, where the forward runs under bf16 autocast)."""
    return torch.float32 if device.type == "cpu" or precision == "fp32" else None


def is_btm_folder(path: str | Path) -> bool:
    return (Path(path) / BTM_FILE).is_file()


def checkpoint_folders(path: str | Path) -> list[Path]:
    """The checkpoint folders behind a model folder: itself, or a BTM folder's experts."""
    if is_btm_folder(path):
        from upcycle.eval.btm import read_btm_spec

        return list(read_btm_spec(path).expert_paths)
    return [Path(path)]


def check_against_data(path: str | Path, manifest: Manifest, check_tokenizer: bool = True) -> None:
    """Refuse, before any model is loaded, a folder that cannot score the prepared data.

    Reads config files only: each checkpoint must exist and parse, its vocabulary must hold
    every token id of the data, and (with `check_tokenizer`, when the folder has tokenizer
    files) its tokenizer must be the one the data was prepared with.
    """
    from upcycle.checkpoint import load_config
    from upcycle.data import check_tokenizer_matches

    for folder in checkpoint_folders(path):
        vocab_size = load_config(folder).vocab_size
        if vocab_size < manifest.tokenizer.id_upper_bound:
            raise UpcycleError(
                f"{folder} has a vocabulary of {vocab_size} ids but the data in {manifest.root} uses ids "
                f"up to {manifest.tokenizer.id_upper_bound - 1}; prepare the data with this model's tokenizer"
            )
        if check_tokenizer and _has_tokenizer(folder):
            try:
                check_tokenizer_matches(manifest, folder)
            except UpcycleError as error:
                raise UpcycleError(
                    f"{error} (or, if the two tokenizers are known to agree, skip this check with "
                    "--no-tokenizer-check)"
                ) from None


def _has_tokenizer(folder: Path) -> bool:
    from upcycle.data.tokenizer import tokenizer_files

    try:
        tokenizer_files(folder)
    except UpcycleError:
        return False
    return True


def load_evaluable(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Evaluable:
    """A checkpoint or BTM folder as an evaluable model on `device`, in eval mode."""
    if is_btm_folder(path):
        from upcycle.eval.btm import BTMEnsemble

        return BTMEnsemble.load(path, device=device, dtype=dtype)
    from upcycle.checkpoint import load_model

    return load_model(path, dtype=dtype, device=device)


def vocab_size_of(model: Evaluable) -> int:
    size = getattr(model, "vocab_size", None)
    if isinstance(size, int):
        return size
    return int(model.config.vocab_size)


def device_of(model: Evaluable) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def model_names(specs: Sequence[ModelSpec] | Mapping[str, ModelSpec]) -> dict[str, ModelSpec]:
    """Display names for models: given names, else folder names (made unique with parent folders)."""
    if isinstance(specs, Mapping):
        return dict(specs)
    names: dict[str, ModelSpec] = {}
    for index, spec in enumerate(specs):
        name = _short_name(spec, index)
        if name in names:
            name = str(Path(spec)) if isinstance(spec, str | Path) else f"{name}-{index}"
        if name in names:
            raise UpcycleError(f"model {name!r} is listed twice; list each model once")
        names[name] = spec
    return names


def _short_name(spec: ModelSpec, index: int) -> str:
    if isinstance(spec, str | Path):
        return Path(spec).resolve().name or str(spec)
    return f"model{index}"
