"""Load any supported checkpoint folder into a `Transformer`: HF dense (Llama, Mistral, Qwen2,
Qwen3), HF MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) or native.

The model is built on the meta device and the tensors are assigned as they are read, so loading
holds one copy of the weights. Safetensors are preferred; a `.bin` checkpoint is read only with
`torch.load(weights_only=True)`, which refuses pickled code.

HF MoE checkpoints store each expert's matrices under its own keys. After the family's renames
they read `model.layers.L.mlp.experts.N.{gate,up,down}_proj.weight`; `match_tensors` places each
one in the native stacked tensor (`ExpertSlice`: W_gate in rows 0..F-1 of `gate_up_proj[N]`,
W_up in rows F..2F-1, W_down as `down_proj[N]`), and `CheckpointTensors` assembles a stacked
tensor when it is asked for. Checkpoints that already hold the fused 3-D tensors need no
stacking: their names are the native ones.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from upcycle.checkpoint.architectures import architecture_for, model_config_from_hf
from upcycle.checkpoint.native import NATIVE_MODEL_TYPE
from upcycle.checkpoint.safetensors_io import SafetensorsReader
from upcycle.errors import UpcycleError, describe_validation_error, validated
from upcycle.model.config import ModelConfig
from upcycle.model.transformer import Transformer

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# One expert's matrix in the classic per-expert layout (names after the family's renames).
EXPERT_MATRIX = re.compile(
    r"^(?P<experts>model\.layers\.\d+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<which>gate|up|down)_proj\.weight$"
)


def expert_matrix_name(experts_prefix: str, expert: int, which: str) -> str:
    """`model.layers.L.mlp.experts` + expert 3 + `gate` -> `model.layers.L.mlp.experts.3.gate_proj.weight`."""
    return f"{experts_prefix}.{expert}.{which}_proj.weight"


@dataclass(frozen=True)
class ExpertSlice:
    """Where one expert's matrix goes: rows `row_start:row_start + rows` of `native_name[expert]`,
    a stacked tensor of shape `stacked_shape` ([E, 2F, D] gate_up_proj or [E, D, F] down_proj)."""

    native_name: str
    expert: int
    row_start: int
    stacked_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        _, rows, cols = self.stacked_shape
        return (rows // 2 if self.native_name.endswith("gate_up_proj") else rows, cols)


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
    except UnicodeDecodeError as error:
        raise UpcycleError(f"{config_path} is not UTF-8 text; fix or re-create it") from error
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
    where = str(Path(path) / "config.json")
    try:
        return model_config_from_hf(hf)
    except ValidationError as error:  # a key missing, of the wrong type or out of range
        raise UpcycleError(describe_validation_error(error, where)) from error
    except UpcycleError as error:  # say which file, since a convert may read several
        raise UpcycleError(f"{where}: {error}") from error


def _load_bin(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / BIN_INDEX
    files = [BIN_SINGLE]
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise UpcycleError(f"{index} is not a valid checkpoint index; re-create it") from error
        if not all(isinstance(name, str) and name == Path(name).name for name in files):
            raise UpcycleError(f"{index} must name shard files in the same folder; re-create it")
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


def _expert_slice(name: str, expected: dict[str, tuple[int, ...]]) -> ExpertSlice | None:
    """The stacked-tensor slice a per-expert matrix fills, or None when `name` is not one."""
    match = EXPERT_MATRIX.match(name)
    if match is None:
        return None
    which = match["which"]
    native = f"{match['experts']}.{'down_proj' if which == 'down' else 'gate_up_proj'}"
    if native not in expected or int(match["expert"]) >= expected[native][0]:
        return None
    row_start = expected[native][1] // 2 if which == "up" else 0
    return ExpertSlice(native, int(match["expert"]), row_start, expected[native])


def _stacked_complete(native: str, shape: tuple[int, ...], slices: set[tuple[int, int]]) -> bool:
    return len(slices) == shape[0] * (2 if native.endswith("gate_up_proj") else 1)


def match_tensors(
    folder: Path, config: ModelConfig, renames: dict[str, str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, str | ExpertSlice]:
    """Map the checkpoint's tensor names onto the model's, checking names and shapes only (no
    tensor is read). Returns {checkpoint name: model name, or the `ExpertSlice` it fills}."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Transformer(config).state_dict().items()}
    mapping: dict[str, str | ExpertSlice] = {}
    filled: dict[str, set[tuple[int, int]]] = {}  # stacked native name -> (expert, row_start) seen
    for name, shape in shapes.items():
        ours = _renamed(name, renames)
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some tied checkpoints store the head too; ours uses the embedding
        part = _expert_slice(ours, expected)
        if part is None and ours not in expected:
            raise UpcycleError(
                f"{folder} has tensor {name!r}, which a {config.architecture} model of this config "
                "does not have; check that config.json matches the weights"
            )
        wanted = expected[ours] if part is None else part.shape
        if shape != wanted:
            raise UpcycleError(
                f"{folder}: tensor {name!r} has shape {shape} but config.json implies {wanted}; "
                "check that config.json matches the weights"
            )
        if part is not None:
            seen = filled.setdefault(part.native_name, set())
            if (part.expert, part.row_start) in seen:
                raise UpcycleError(
                    f"{folder} holds expert {part.expert} of {part.native_name} twice (tensor {name!r}); "
                    "keep one copy of each expert"
                )
            seen.add((part.expert, part.row_start))
        mapping[name] = ours if part is None else part
    covered = {ours for ours in mapping.values() if isinstance(ours, str)}
    both = sorted(covered & set(filled))
    if both:
        raise UpcycleError(
            f"{folder} holds {both[0]!r} both fused and as per-expert tensors; keep one of the two forms"
        )
    covered |= {
        native for native, seen in filled.items() if _stacked_complete(native, expected[native], seen)
    }
    missing = sorted(set(expected) - covered)
    if missing:
        raise UpcycleError(
            f"{folder} lacks {len(missing)} tensor(s) the config needs, first {missing[0]!r}; "
            "copy the whole checkpoint or fix config.json"
        )
    return mapping


def tensor_renames(hf: dict[str, Any]) -> dict[str, str]:
    return {} if is_native(hf) else architecture_for(hf.get("model_type")).tensor_renames


class CheckpointTensors:
    """A checkpoint's tensors under their native names, read one at a time on request; a stacked
    expert tensor is assembled from the per-expert matrices that fill it."""

    def __init__(
        self, source: dict[str, torch.Tensor] | SafetensorsReader, mapping: dict[str, str | ExpertSlice]
    ) -> None:
        self._source = source
        self._direct: dict[str, str] = {}
        self._parts: dict[str, list[tuple[str, ExpertSlice]]] = {}
        for theirs, ours in mapping.items():
            if isinstance(ours, ExpertSlice):
                self._parts.setdefault(ours.native_name, []).append((theirs, ours))
            else:
                self._direct[ours] = theirs

    def names(self) -> list[str]:
        return [*self._direct, *self._parts]

    def _read(self, name: str) -> torch.Tensor:
        return self._source.get(name) if isinstance(self._source, SafetensorsReader) else self._source[name]

    def shape(self, native_name: str) -> tuple[int, ...]:
        if native_name in self._parts:
            return self._parts[native_name][0][1].stacked_shape
        theirs = self._direct[native_name]
        if isinstance(self._source, SafetensorsReader):
            return self._source.entries[theirs].shape
        return tuple(self._source[theirs].shape)

    def dtype(self, native_name: str) -> torch.dtype:
        theirs = self._parts[native_name][0][0] if native_name in self._parts else self._direct[native_name]
        if isinstance(self._source, SafetensorsReader):
            return self._source.entries[theirs].dtype
        return self._source[theirs].dtype

    def read_into(
        self, native_name: str, out: torch.Tensor, start: int | None = None, stop: int | None = None
    ) -> None:
        """Tensor `native_name` (or its rows [start, stop)) written into `out`, which has its dtype
        and shape; safetensors bytes go straight into `out`'s storage, with no temporary."""
        theirs = self._direct.get(native_name)
        if theirs is not None and isinstance(self._source, SafetensorsReader) and out.is_contiguous():
            self._source.read_into(theirs, out, start, stop)
        elif start is None:
            out.copy_(self.get(native_name))
        else:
            out.copy_(self.get_rows(native_name, start, stop))

    def get_rows(self, native_name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor; reads only those bytes when the file allows it."""
        theirs = self._direct.get(native_name)
        if theirs is not None and isinstance(self._source, SafetensorsReader):
            return self._source.get_rows(theirs, start, stop)
        return self.get(native_name)[start:stop]

    def get(self, native_name: str) -> torch.Tensor:
        if native_name in self._direct:
            return self._read(self._direct[native_name])
        stacked = None
        for theirs, part in self._parts[native_name]:
            matrix = self._read(theirs)
            if stacked is None:
                stacked = torch.empty(part.stacked_shape, dtype=matrix.dtype)
            stacked[part.expert, part.row_start : part.row_start + matrix.shape[0]] = matrix
        return stacked


def open_checkpoint(path: str | Path) -> tuple[ModelConfig, CheckpointTensors]:
    """The config of a checkpoint folder and its tensors by native name; names and shapes are
    checked against the config before any tensor is read."""
    folder = Path(path)
    hf = read_config_json(folder)
    config = load_config(folder)
    source = read_state(folder)
    mapping = match_tensors(folder, config, tensor_renames(hf), _source_shapes(source))
    return config, CheckpointTensors(source, mapping)


def load_model(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Load an HF (dense or MoE) or native checkpoint folder as a `Transformer` in eval mode.

    Names and shapes are checked against the config before any tensor is read.
    """
    config, checkpoint = open_checkpoint(path)
    tensors: dict[str, torch.Tensor] = {}
    for name in checkpoint.names():
        tensor = checkpoint.get(name)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.to(device)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    materialize_buffers(model, device)
    return model.eval()


def materialize_buffers(model: torch.nn.Module, device: str | torch.device) -> None:
    """Give the non-persistent buffers (not in checkpoints, e.g. a router's step counter) real
    storage: built on the meta device, they would still be meta after loading. They are counters
    and start at zero."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                module.register_buffer(
                    name, torch.zeros(buffer.shape, dtype=buffer.dtype, device=device), persistent=False
                )
