"""`ModelConfig`: the one typed description of every model upcycle builds.

The dense fields mirror a Hugging Face decoder config (Llama, Mistral, Qwen2, Qwen3) so that an
HF checkpoint maps onto it field by field (see `upcycle/checkpoint/architectures/`). The `moe`
and `moa` sections turn the same model into a Mixture-of-Experts or a BAM model; a dense model
leaves them unset. `MoEConfig` follows methods.md §1 (routing, losses, capacity) and §5 (the
granularity of fine-grained experts); `MoAConfig` follows §4.2 (BAM's attention experts).

Validation happens at construction: a bad value raises a pydantic `ValidationError` whose
message names the field and the fix; `upcycle.errors` turns it into one sentence at the CLI.
"""

from __future__ import annotations

import functools
import types
import typing
import warnings
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "relu2"]


def _union_members(annotation: object) -> set[object]:
    """The types an annotation accepts at its top level (`int | None` -> {int, NoneType})."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_union_members(arg) for arg in typing.get_args(annotation)))
    return {annotation}


@functools.cache
def _takes_numbers_not_bools(model_cls: type[BaseModel], field_name: str) -> bool:
    field = model_cls.model_fields.get(field_name)
    members = _union_members(field.annotation) if field is not None else set()
    return bool(members & {int, float}) and bool not in members


class StrictModel(BaseModel):
    """Base for every config: unknown keys are refused, values are validated on assignment,
    and a number field refuses `true`/`false` (pydantic's lax mode would read them as 1 and 0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, bool) and _takes_numbers_not_bools(cls, info.field_name):
            raise ValueError(f"got {str(value).lower()} where a number is expected; write a number such as 1")
        return value


class RopeConfig(StrictModel):
    """Rotary position embedding: base `theta` and optional scaling of the frequencies.

    `type`: `default` (none), `linear` (positions divided by `factor`), `llama3` (Llama 3.1's
    wavelength-dependent smoothing between `low_freq_factor` and `high_freq_factor`).
    """

    theta: float = Field(10000.0, gt=0)
    type: Literal["default", "linear", "llama3"] = "default"
    factor: float = Field(1.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_llama3(self) -> RopeConfig:
        if self.type == "llama3":
            if self.original_max_position_embeddings is None:
                raise ValueError(
                    "rope type llama3 needs original_max_position_embeddings; "
                    "copy it from the source config's rope_scaling"
                )
            if self.high_freq_factor <= self.low_freq_factor:
                raise ValueError(
                    "rope high_freq_factor must be larger than low_freq_factor (Llama 3.1 uses 4 and 1)"
                )
        return self


MoERouting = Literal["topk_softmax", "softmax_topk", "soft", "sample_top1"]
LayerSelection = Literal["all", "every_other"] | list[int]


def _select_layers(layers: str | list[int], num_layers: int) -> list[int]:
    """0-based layer indices; `every_other` is 1, 3, 5, ... (the 2nd layer 1-indexed, §9.17)."""
    if layers == "all":
        return list(range(num_layers))
    if layers == "every_other":
        return list(range(1, num_layers, 2))
    return sorted(layers)


def _check_layer_list(section: str, layers: str | list[int]) -> None:
    if isinstance(layers, str):
        return
    if not layers:
        raise ValueError(
            f"{section}.layers is empty; list at least one layer or remove the {section} section"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{section}.layers {layers} repeats an index; list each layer once")


class MoEConfig(StrictModel):
    """The FFN Mixture-of-Experts section (methods.md §1).

    - `routing`: `topk_softmax` (TS, Mixtral/BTX), `softmax_topk` (ST, Switch/NVIDIA, optionally
      `renormalize`d), `soft` (every expert, `top_k` unused), `sample_top1` (BTX ablation:
      Gumbel-softmax sample with temperature max(0.5, exp(-decay·step)), §1.1 and §9.10; the
      first layer routes softly unless `sample_top1_soft_first_layer` is off). TS with top_k 1
      is allowed (it preserves the dense function) but gives the router no gradient (§1.1).
    - `intermediate_size`: width F of one routed expert; default: the dense width divided by
      `granularity`. `granularity` G records the NVIDIA fine-grained split (§5.2,
      N = E·G): N and the dense width must be multiples of G. Whether top_k is a multiple of G
      (needed for virtual groups to be exact) is the recipe's check, not the model's: BTX's
      split-expert ablation routes top-2 over 8 slices on purpose.
    - Shared experts are always on (Qwen2-MoE, DeepSeek-MoE); several are held as one MLP of
      width `num_shared_experts · shared_intermediate_size` (identical function: neurons are
      independent). `shared_expert_gate` multiplies their output by sigmoid(w·x) (Qwen2-MoE).
    - `capacity_factor`: None is dropless (the default, §9.13); otherwise each expert keeps at
      most ceil(T·K·CF/N) assignments of a batch, dropping the lowest router probabilities (§1.3).
    - `aux_loss` (`switch` or `btx`, §1.2, §9.9) times `aux_loss_coef`, plus the router z-loss
      times `z_loss_coef`; a zero coefficient means the loss is not computed.
    - `layers`: `all`, `every_other` (0-based 1, 3, 5, ...: §9.17) or a list of 0-based indices.
    - `gated`: SwiGLU-style experts (`gate_up_proj` [E, 2F, D]); False gives `up_proj`
      [E, F, D] for non-gated sources (GELU, squared ReLU); the activation is `hidden_act`.
    - `implementation`: `eager` (loop over experts, the reference), `grouped`
      (`upcycle.kernels.grouped_moe`) or `auto` (grouped where `torch._grouped_mm` runs natively).
    - `router_dtype`: the router's logits and softmax are computed in fp32 (fp64 for an fp64
      model, so that exactness tests stay exact), whatever the model dtype.
    """

    num_experts: int = Field(gt=0)
    top_k: int | None = Field(None, gt=0, description="experts per token; unused by soft routing")
    routing: MoERouting = "topk_softmax"
    renormalize: bool = False
    intermediate_size: int | None = Field(None, gt=0)
    granularity: int = Field(1, gt=0)
    num_shared_experts: int = Field(0, ge=0)
    shared_intermediate_size: int | None = Field(None, gt=0)
    shared_expert_gate: bool = False
    capacity_factor: float | None = Field(None, gt=0)
    aux_loss: Literal["switch", "btx", "none"] = "switch"
    aux_loss_coef: float = Field(0.01, ge=0)
    z_loss_coef: float = Field(0.0, ge=0)
    layers: LayerSelection = "all"
    gated: bool = True
    implementation: Literal["auto", "eager", "grouped"] = "auto"
    router_dtype: Literal["float32"] = "float32"
    sample_top1_decay: float = Field(1e-4, ge=0)
    sample_top1_soft_first_layer: bool = True

    @model_validator(mode="after")
    def _check_routing(self) -> MoEConfig:
        if self.routing == "soft":
            if self.top_k is not None and self.top_k != self.num_experts:
                raise ValueError(
                    f"moe.routing soft uses all {self.num_experts} experts, but top_k is {self.top_k}; "
                    "remove moe.top_k or choose a top-k routing"
                )
        elif self.routing == "sample_top1":
            if self.top_k not in (None, 1):
                raise ValueError(
                    f"moe.routing sample_top1 picks one expert; set moe.top_k to 1 (got {self.top_k})"
                )
        elif self.top_k is None:
            raise ValueError(f"moe.routing {self.routing} needs moe.top_k (the number of experts per token)")
        elif self.top_k > self.num_experts:
            raise ValueError(
                f"moe.top_k ({self.top_k}) exceeds moe.num_experts ({self.num_experts}); "
                "lower top_k or add experts"
            )
        if self.renormalize and self.routing != "softmax_topk":
            raise ValueError(
                f"moe.renormalize only applies to softmax_topk routing (routing is {self.routing}); "
                "remove it or set routing: softmax_topk"
            )
        if self.routing == "topk_softmax" and self.top_k == 1:
            warnings.warn(
                "moe routing topk_softmax with top_k 1 gives the router no gradient (methods.md §1.1); "
                "use softmax_topk for top-1 training",
                stacklevel=2,
            )
        return self

    @model_validator(mode="after")
    def _check_experts(self) -> MoEConfig:
        if self.num_experts % self.granularity != 0:
            raise ValueError(
                f"moe.num_experts ({self.num_experts}) must be a multiple of moe.granularity "
                f"({self.granularity}), since N = E·G (methods.md §5.2); change one of them"
            )
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError(
                "moe.shared_expert_gate needs a shared expert; set num_shared_experts ≥ 1 or drop the gate"
            )
        if self.shared_intermediate_size is not None and self.num_shared_experts == 0:
            raise ValueError(
                "moe.shared_intermediate_size is set but there is no shared expert; set num_shared_experts ≥ 1"
            )
        _check_layer_list("moe", self.layers)
        return self

    @property
    def experts_per_token(self) -> int:
        """K: how many routed experts each token uses (all of them for soft routing)."""
        if self.routing == "soft":
            return self.num_experts
        return 1 if self.routing == "sample_top1" else int(self.top_k or 1)

    def layer_indices(self, num_layers: int) -> list[int]:
        return _select_layers(self.layers, num_layers)


class MoAConfig(StrictModel):
    """BAM's mixture of attention experts (methods.md §4.2), built by `upcycle.model.moa`.

    `routing`: `soft` (BAM: every token uses every attention expert) or `topk` (the ablation;
    needs `top_k`). `share_kv`: one K/V projection shared by the experts (shared-KV) instead of
    one per expert (expert-KV, BAM's default). `z_loss_coef` optionally adds the router z-loss.
    `implementation`: `eager` (a loop of attentions), `wide` (one attention with E·H heads) or
    `auto`.
    """

    num_experts: int = Field(gt=0)
    routing: Literal["soft", "topk"] = "soft"
    top_k: int | None = Field(None, gt=0)
    share_kv: bool = False
    z_loss_coef: float = Field(0.0, ge=0)
    layers: Literal["all"] | list[int] = "all"
    implementation: Literal["auto", "eager", "wide"] = "auto"

    @model_validator(mode="after")
    def _check_routing(self) -> MoAConfig:
        if self.routing == "topk":
            if self.top_k is None:
                raise ValueError("moa.routing topk needs moa.top_k (attention experts per token)")
            if self.top_k > self.num_experts:
                raise ValueError(
                    f"moa.top_k ({self.top_k}) exceeds moa.num_experts ({self.num_experts}); "
                    "lower top_k or add experts"
                )
        elif self.top_k is not None:
            raise ValueError("moa.top_k is only used by routing topk; remove it or set moa.routing: topk")
        _check_layer_list("moa", self.layers)
        return self

    def layer_indices(self, num_layers: int) -> list[int]:
        return _select_layers(self.layers, num_layers)


class ModelConfig(StrictModel):
    """Everything needed to build a `Transformer`: dense, or MoE / BAM with the optional sections.

    Field names follow the HF config names where one exists, so that a user reading either
    recognises the other.
    """

    architecture: str = Field("llama", description="source family: llama, mistral, qwen2, qwen3")
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    head_dim: int | None = Field(None, gt=0)
    hidden_act: Activation = "silu"
    max_position_embeddings: int = Field(2048, gt=0)
    rms_norm_eps: float = Field(1e-6, gt=0)
    rope: RopeConfig = Field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = Field(None, gt=0)
    block: Literal["sequential", "parallel"] = "sequential"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    moe: MoEConfig | None = None
    moa: MoAConfig | None = None

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        kv_heads = self.kv_heads
        if self.num_attention_heads % kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads}); pick a divisor of the head count"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly"
            )
        if self.attention_head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.attention_head_dim}) must be even for RoPE")
        return self

    @model_validator(mode="after")
    def _check_sections(self) -> ModelConfig:
        for name, section in (("moe", self.moe), ("moa", self.moa)):
            if section is None or isinstance(section.layers, str):
                continue
            outside = [i for i in section.layers if not 0 <= i < self.num_hidden_layers]
            if outside:
                raise ValueError(
                    f"{name}.layers {outside} are outside 0..{self.num_hidden_layers - 1} "
                    f"(0-based, num_hidden_layers = {self.num_hidden_layers}); fix the indices"
                )
        if self.moe is not None:
            self._check_moe_widths(self.moe)
        return self

    def _check_moe_widths(self, moe: MoEConfig) -> None:
        G, F = moe.granularity, self.intermediate_size
        if moe.intermediate_size is None and F % G != 0:
            raise ValueError(
                f"intermediate_size ({F}) is not divisible by moe.granularity ({G}); "
                "pick a granularity that divides it or set moe.intermediate_size"
            )
        if moe.intermediate_size is not None and G > 1 and moe.intermediate_size * G != F:
            raise ValueError(
                f"moe.intermediate_size ({moe.intermediate_size}) × moe.granularity ({G}) must equal "
                f"intermediate_size ({F}); drop moe.intermediate_size or set granularity to 1"
            )
        if self.mlp_bias:
            raise ValueError("MoE experts have no bias; set mlp_bias false or remove the moe section")
        if self.num_moe_layers() == 0:
            raise ValueError(
                "moe.layers every_other selects no layer of a 1-layer model; use layers: all or [0]"
            )

    @property
    def moe_intermediate_size(self) -> int | None:
        """Width F of one routed expert (None for a dense model)."""
        if self.moe is None:
            return None
        return self.moe.intermediate_size or self.intermediate_size // self.moe.granularity

    @property
    def shared_expert_intermediate_size(self) -> int:
        """Total width of the shared-expert MLP (0 when there is none)."""
        if self.moe is None or self.moe.num_shared_experts == 0:
            return 0
        width = self.moe.shared_intermediate_size or self.moe_intermediate_size
        return self.moe.num_shared_experts * int(width or 0)

    def moe_layer_routing(self, layer_index: int) -> str:
        """This MoE layer's routing: sample_top1 routes the first MoE layer softly (§1.1)."""
        assert self.moe is not None
        first_moe_layer = min(self.moe.layer_indices(self.num_hidden_layers))
        soft_first = self.moe.routing == "sample_top1" and self.moe.sample_top1_soft_first_layer
        return "soft" if soft_first and layer_index == first_moe_layer else self.moe.routing

    def moe_experts_per_token(self, layer_index: int) -> int:
        """K of this MoE layer (all experts where it routes softly)."""
        assert self.moe is not None
        if self.moe_layer_routing(layer_index) == "soft":
            return self.moe.num_experts
        return self.moe.experts_per_token

    def is_moe_layer(self, layer_index: int) -> bool:
        return self.moe is not None and layer_index in self.moe.layer_indices(self.num_hidden_layers)

    def is_moa_layer(self, layer_index: int) -> bool:
        return self.moa is not None and layer_index in self.moa.layer_indices(self.num_hidden_layers)

    def num_moe_layers(self) -> int:
        return 0 if self.moe is None else len(self.moe.layer_indices(self.num_hidden_layers))

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)
