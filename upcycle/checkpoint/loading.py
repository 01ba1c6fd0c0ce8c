"""Load any supported checkpoint folder into a `Transformer`: HF dense (Llama, Mistral, Qwen2,
Qwen3) or native.

The model is built on the meta device and the tensors are assigned as they are read, so loading
holds one copy of the weights. Safetensors are preferred; a `.bin` checkpoint is read only with
`torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from upcycle.checkpoint.architectures import architecture_for, model_config_from_hf
from upcycle.checkpoint.native import NATIVE_MODEL_TYPE
from upcycle.checkpoint.safetensors_io import SafetensorsReader
from upcycle.errors import UpcycleError, validated
from upcycle.model.config import ModelConfig
from upcycle.model.transformer import Transformer

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def read_config_json(path: str | Path) -> dict[str, Any]:
    folder = Path(path)
    if not folder.exists():
        raise UpcycleError(f"{folder} does not exist; give the path of a checkpoint folder")
    if not folder.is_dir():
        raise UpcycleError(f"{folder} is a file; give the checkpoint folder that holds config.json")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UpcycleError(
            f"{folder} has no config.json; point to a Hugging Face or upcycle checkpoint folder"
        )
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise UpcycleError(
            f"{config_path} is not valid JSON ({error.msg} at line {error.lineno}); fix or re-create it"
        ) from error
    if not isinstance(data, dict):
        raise UpcycleError(f"{config_path} must hold a JSON object; fix or re-create it")
    return data


def is_native(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") == NATIVE_MODEL_TYPE


def load_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder (native or HF)."""
    hf = read_config_json(path)
    if is_native(hf):
        return validated(ModelConfig, hf.get("upcycle"), f"{Path(path) / 'config.json'} (key 'upcycle')")
    return model_config_from_hf(hf)


def _load_bin(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / BIN_INDEX
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [BIN_SINGLE]
    )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = folder / name
        if not file.is_file():
            raise UpcycleError(f"{folder} is missing {name}; copy the whole checkpoint")
        try:
            state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except pickle.UnpicklingError as error:
            raise UpcycleError(
                f"{file} was refused: it contains pickled objects other than tensors, which could run code; "
                "convert it to safetensors with a trusted tool"
            ) from error
        except (RuntimeError, EOFError, OSError) as error:
            raise UpcycleError(f"{file} is truncated or not a PyTorch checkpoint; re-download it") from error
    return state


def read_state(folder: Path) -> dict[str, torch.Tensor] | SafetensorsReader:
    """A lazy safetensors reader when the folder has safetensors, else the .bin tensors."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return SafetensorsReader(folder)
    if (folder / BIN_SINGLE).is_file() or (folder / BIN_INDEX).is_file():
        return _load_bin(folder)
    raise UpcycleError(
        f"{folder} holds no weights (*.safetensors or pytorch_model.bin); copy the whole checkpoint"
    )


def _renamed(name: str, renames: dict[str, str]) -> str:
    for theirs, ours in renames.items():
        name = name.replace(theirs, ours)
    return name


def _source_shapes(source: dict[str, torch.Tensor] | SafetensorsReader) -> dict[str, tuple[int, ...]]:
    if isinstance(source, SafetensorsReader):
        return {name: entry.shape for name, entry in source.entries.items()}
    return {name: tuple(t.shape) for name, t in source.items()}


def match_tensors(
    folder: Path, config: ModelConfig, renames: dict[str, str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, str]:
    """Map the checkpoint's tensor names onto the model's, checking names and shapes only (no
    tensor is read). Returns {checkpoint name: model name}."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(config).state_dict().items()}
    mapping: dict[str, str] = {}
    for name, shape in shapes.items():
        ours = _renamed(name, renames)
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some tied checkpoints store the head too; ours uses the embedding
        if ours not in expected:
            raise UpcycleError(
                f"{folder} has tensor {name!r}, which a {config.architecture} model of this config "
                "does not have; check that config.json matches the weights"
            )
        if shape != expected[ours]:
            raise UpcycleError(
                f"{folder}: tensor {name!r} has shape {shape} but config.json implies {expected[ours]}; "
                "check that config.json matches the weights"
            )
        mapping[name] = ours
    missing = sorted(set(expected) - set(mapping.values()))
    if missing:
        raise UpcycleError(
            f"{folder} lacks {len(missing)} tensor(s) the config needs, first {missing[0]!r}; "
            "copy the whole checkpoint or fix config.json"
        )
    return mapping


def tensor_renames(hf: dict[str, Any]) -> dict[str, str]:
    return {} if is_native(hf) else architecture_for(hf.get("model_type")).tensor_renames


def load_model(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Load an HF dense or native checkpoint folder as a `Transformer` in eval mode.

    Names and shapes are checked against the config before any tensor is read.
    """
    folder = Path(path)
    hf = read_config_json(folder)
    config = load_config(folder)
    source = read_state(folder)
    mapping = match_tensors(folder, config, tensor_renames(hf), _source_shapes(source))
    tensors: dict[str, torch.Tensor] = {}
    for name, ours in mapping.items():
        tensor = source.get(name) if isinstance(source, SafetensorsReader) else source[name]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[ours] = tensor.to(device)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()
