"""What every recipe shares: the convert YAML, typed parameters, lazy sources, the recipe class.

A recipe maps source tensors to the tensors of the target (MoE) model, one target tensor at a
time, by name. It never opens a file: `SourceModel.tensor(name)` reads one source tensor lazily,
and the conversion engine (`upcycle.checkpoint.convert`) writes each result as soon as it exists.

Target tensors fall into a few kinds, dispatched by `UpcycleRecipe.build`:
- routers (`model.layers.L.mlp.gate.weight`, `model.layers.L.self_attn.router.weight`);
- FFN experts (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]);
- attention experts (`self_attn.experts.*`, BAM only);
- everything else ("shared" tensors: embeddings, norms, attention, dense FFNs of non-MoE layers,
  LM head), copied from the seed by default; BTX and BAM average them (methods.md §3.2).

Shape letters: E experts, F expert width, D model width, G granularity.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from upcycle.checkpoint.convert import all_finite
from upcycle.checkpoint.loading import CheckpointTensors, open_checkpoint
from upcycle.checkpoint.native import TOKENIZER_FILES
from upcycle.errors import UpcycleError
from upcycle.model.config import LayerSelection, ModelConfig, MoEConfig, StrictModel

OutputFormat = Literal["native", "mixtral", "qwen2_moe", "qwen3_moe"]
OutputDtype = Literal["auto", "float64", "float32", "bfloat16", "float16"]


class RouterInit(StrictModel):
    """New routers: N(0, std²) (`normal`, methods.md §9.11) or uniform with that std; std 0 gives
    a zero router (§7 F3). Seeded per layer, so a router does not depend on conversion order."""

    model_config = ConfigDict(allow_inf_nan=False)

    std: float = Field(0.02, ge=0)
    seed: int = 0
    distribution: Literal["normal", "uniform"] = "normal"


class OutputOptions(StrictModel):
    format: OutputFormat = "native"
    dtype: OutputDtype = "auto"
    shard_size_mb: int = Field(2048, gt=0, description="largest shard file, in MiB")


class ConvertConfig(BaseModel):
    """The convert YAML. `recipe`, `sources` and `output` are common; every other key is a
    parameter of the chosen recipe, validated by that recipe's `Params` model."""

    model_config = ConfigDict(extra="allow")

    recipe: str
    sources: list[str] = Field(min_length=1)
    output: OutputOptions = Field(default_factory=OutputOptions)

    def recipe_parameters(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MoEParams(StrictModel):
    """Parameters every MoE recipe accepts (names are the stable convert-YAML keys)."""

    model_config = ConfigDict(allow_inf_nan=False)  # an infinite scale or std would write inf weights

    num_experts: int | None = Field(None, gt=0)
    top_k: int = Field(2, gt=0)
    routing: Literal["topk_softmax", "softmax_topk", "soft", "sample_top1"] = "topk_softmax"
    renormalize: bool = False
    router_init: RouterInit = Field(default_factory=RouterInit)
    moe_layers: LayerSelection = "all"
    aux_loss: Literal["switch", "btx", "none"] = "switch"
    aux_loss_coef: float = Field(0.01, ge=0)
    z_loss_coef: float = Field(0.0, ge=0)
    capacity_factor: float | None = Field(None, gt=0)


def tokenizer_hash(folder: Path) -> str | None:
    """sha256 over the tokenizer files present (name and bytes, fixed order); None if none."""
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        if name == "generation_config.json" or not (folder / name).is_file():
            continue
        found = True
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest() if found else None


@dataclass
class SourceModel:
    """A source checkpoint opened lazily: its config, its tensors by native name, read on demand."""

    folder: Path
    config: ModelConfig
    checkpoint: CheckpointTensors
    tokenizer_sha256: str | None = None
    _recent: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict)

    RECENT = 3  # recipes read a layer's gate, up and down repeatedly while stacking experts

    @classmethod
    def open(cls, path: str | Path) -> SourceModel:
        folder = Path(path)
        config, checkpoint = open_checkpoint(folder)
        return cls(folder, config, checkpoint, tokenizer_hash(folder))

    def _native(self, name: str) -> str:
        """`lm_head.weight` of a tied model is the embedding."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return name

    def _finite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not all_finite(tensor):
            raise UpcycleError(
                f"source {self.folder} holds NaN or inf values in tensor {name!r}; "
                "convert only a source with finite weights"
            )
        return tensor

    def tensor(self, name: str) -> torch.Tensor:
        """One source tensor by its native name (kept among the few most recent; checked finite)."""
        name = self._native(name)
        if name in self._recent:
            return self._recent[name]
        tensor = self._finite(name, self.checkpoint.get(name))
        self._recent[name] = tensor
        while len(self._recent) > self.RECENT:
            self._recent.popitem(last=False)
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.shape(self._native(name))

    def forget_recent(self) -> None:
        self._recent.clear()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, read without loading the rest (not cached; checked finite)."""
        name = self._native(name)
        return self._finite(name, self.checkpoint.get_rows(name, start, stop))

    def dtype(self) -> torch.dtype:
        return self.dtype_of("model.embed_tokens.weight")

    def dtype_of(self, name: str) -> torch.dtype:
        return self.checkpoint.dtype(self._native(name))

    def read_into(
        self, name: str, out: torch.Tensor, start: int | None = None, stop: int | None = None
    ) -> None:
        """Tensor `name` (or its rows [start, stop)) written into `out`, checked finite in the
        source's own dtype. When `out` has that dtype the bytes are read straight into it, with no
        temporary; otherwise the tensor is read, checked, then cast."""
        native = self._native(name)
        if out.dtype == self.checkpoint.dtype(native):
            self.checkpoint.read_into(native, out, start, stop)
            self._finite(native, out)
        else:
            out.copy_(self.tensor(name) if start is None else self.rows(name, start, stop))


LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def layer_of(name: str) -> tuple[int, str] | None:
    match = LAYER_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic (averages, scaling) in fp64 for fp64 sources (exactness tests), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_router(init: RouterInit, layer: int, rows: int, width: int, salt: int = 0) -> torch.Tensor:
    """A fresh router [rows, width] in fp32, seeded by (seed, layer, salt)."""
    generator = torch.Generator().manual_seed(init.seed * 1_000_003 + layer * 1_009 + salt)
    if init.std == 0:
        return torch.zeros(rows, width)
    if init.distribution == "uniform":
        half_width = init.std * 3**0.5  # uniform on [-a, a] has std a/√3
        return (torch.rand(rows, width, generator=generator) * 2 - 1) * half_width
    return torch.randn(rows, width, generator=generator) * init.std


FFN_MATRIX = Literal["gate", "up", "down"]


def dense_ffn_matrix(source: SourceModel, layer: int, which: FFN_MATRIX) -> torch.Tensor:
    """W_gate [F, D], W_up [F, D] or W_down [D, F] of a dense layer."""
    return source.tensor(f"model.layers.{layer}.mlp.{which}_proj.weight")


class UpcycleRecipe:
    """Base of every recipe; subclasses set the class attributes and override the pieces."""

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[StrictModel]] = MoEParams
    min_sources: ClassVar[int] = 1
    max_sources: ClassVar[int | None] = 1

    def __init__(self, params: StrictModel, sources: list[SourceModel]) -> None:
        self.params = params
        self.sources = sources
        self.seed = sources[0]
        self.target = self.target_config()

    # -- what the subclass decides ------------------------------------------------------------
    def num_experts(self) -> int:
        return self.params.num_experts or 8

    def moe_section(self) -> MoEConfig:
        p = self.params
        return MoEConfig(
            num_experts=self.num_experts(),
            top_k=None if p.routing == "soft" else p.top_k,
            routing=p.routing,
            renormalize=p.renormalize,
            layers=p.moe_layers,
            aux_loss=p.aux_loss,
            aux_loss_coef=p.aux_loss_coef,
            z_loss_coef=p.z_loss_coef,
            capacity_factor=p.capacity_factor,
            gated=True,
        )

    def target_config(self) -> ModelConfig:
        data = self.seed.config.model_dump()
        data["moe"] = self.moe_section().model_dump()
        return ModelConfig.model_validate(data)

    def validate(self) -> None:
        """Recipe constraints beyond the config's own checks; raise UpcycleError."""
        if self.seed.config.hidden_act not in ("silu", "gelu", "gelu_tanh", "relu", "relu2"):
            raise UpcycleError(
                f"activation {self.seed.config.hidden_act} is not supported by recipe {self.name}"
            )

    def expert_matrix(self, layer: int, which: FFN_MATRIX, expert: int) -> torch.Tensor:
        """W_gate [F, D], W_up [F, D] or W_down [D, F] of routed expert `expert` of `layer`."""
        return dense_ffn_matrix(self.seed, layer, which)

    def expert_source(self, layer: int, which: FFN_MATRIX, expert: int) -> SourceModel | None:
        """The source whose dense matrix *is* this expert's, unchanged, or None when the recipe
        transforms it. Returning a source lets the engine read the bytes straight into the
        expert's slot of the stacked tensor (no copy); `expert_matrix` must then agree."""
        return None

    def router(self, layer: int) -> torch.Tensor:
        return new_router(self.params.router_init, layer, self.num_experts(), self.target.hidden_size)

    def shared_tensor(self, name: str) -> torch.Tensor:
        return self.seed.tensor(name)

    def attention_tensor(self, layer: int, name: str) -> torch.Tensor:
        raise KeyError(name)

    # -- dispatch -----------------------------------------------------------------------------
    def build(self, name: str) -> torch.Tensor:
        """The target tensor called `name` (native naming), in any float dtype."""
        located = layer_of(name)
        if located is not None:
            layer, rest = located
            if rest == "mlp.gate.weight" and self.target.is_moe_layer(layer):
                return self.router(layer)
            if rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
                return self._stacked_experts(layer, rest)
            if (
                rest.startswith("self_attn.")
                and self.target.moa is not None
                and self.target.is_moa_layer(layer)
            ):
                return self.attention_tensor(layer, rest)
        return self.shared_tensor(name)

    def _stacked_experts(self, layer: int, rest: str) -> torch.Tensor:
        """Fill the stacked tensor expert by expert: a matrix that a source holds unchanged
        (`expert_source`) is read straight into its slot, any other is built by `expert_matrix`
        and copied in (one source matrix in memory at a time)."""
        E, F, D = self.num_experts(), int(self.target.moe_intermediate_size), self.target.hidden_size
        down = rest.endswith("down_proj")
        parts = (("down", 0, D),) if down else (("gate", 0, F), ("up", F, F))
        out = None
        for expert in range(E):
            for which, row, rows in parts:
                source = self.expert_source(layer, which, expert)
                name = f"model.layers.{layer}.mlp.{which}_proj.weight"
                if source is not None and out is None:
                    out = torch.empty((E, D, F) if down else (E, 2 * F, D), dtype=source.dtype_of(name))
                if source is not None:
                    source.read_into(name, out[expert, row : row + rows])
                    continue
                matrix = self.expert_matrix(layer, which, expert)
                if out is None:
                    out = torch.empty((E, D, F) if down else (E, 2 * F, D), dtype=matrix.dtype)
                out[expert, row : row + rows] = matrix
        for source in self.sources:  # the matrices read for this stack are not needed again
            source.forget_recent()
        return out
