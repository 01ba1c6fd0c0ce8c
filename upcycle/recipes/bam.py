"""`bam`: Branch-Attend-Mix (Zhang et al. 2024), methods.md §4. BTX plus attention experts.

Sources are N dense models branched from one seed; `sources[0]` is treated as the seed (its
config, tokenizer and, with `kv_init: seed`, its K/V). In every mixed layer:
- FFN expert i is the FFN of source i, copied exactly (as BTX);
- attention expert j is the attention of source j, copied exactly: W_q, W_k, W_v, W_o, their
  biases and the QK-norm weights (`upcycle.model.moa.stack_attention_experts`). With
  `attention.share_kv`, one W_k, W_v (and k_norm, K/V biases) serve all experts: the mean over
  the sources (`kv_init: mean`, §9.3, an inference: the paper does not say) or the seed's;
- two new routers, attention and FFN, drawn from `router_init` but seeded independently.
Every other tensor (embeddings, norms, LM head, and the attention or FFN of a layer left dense)
is the uniform mean over the sources (§4.1), as in BTX.

Defaults, and where they come from:
- attention: soft routing (every token uses every attention expert), expert-KV, no
  load-balancing loss, z-loss off (`attention.z_loss_coef`, §9.4); `routing: topk` is the
  paper's ablation.
- FFN: softmax-then-top-1 (ST), not renormalised (§4.2, §9.1). Switch load balancing α = 0.01
  and router z-loss β = 1e-3 are *assumptions*: the paper gives no values (§9.2).
- layers: attention experts sit in every layer that has FFN experts (`moe_layers`);
  `attention.layers` (`all` or a list of 0-based indices) chooses them separately.

Block, and the deviation it brings:
- A parallel seed keeps its parallel block, x + A(norm x) + F(norm x) with one shared norm.
  That is BAM's design (§4.1, §4.2).
- A sequential seed (Llama, Qwen, Mistral) gives "sequential BAM" by default: soft MoA, then
  the FFN MoE, each with its own norm (§9.5). This is NOT the paper's block, and the model card
  says so; BAM avoids the question by choosing a parallel seed.
- `attention.block: parallel` on a sequential seed changes the function of every layer
  (§7.2 N8), so it is refused unless `attention.convert_to_parallel: true` accepts it. The mean
  `input_layernorm` then becomes the shared norm and `post_attention_layernorm` is dropped.
  A parallel seed is never made sequential.

Exactness (methods.md §7): with identical sources the attention part is exact for both
expert-KV and shared-KV (F7), but the default FFN outputs p_max·FFN, not FFN (N7); soft, TS or
`renormalize: true` make the whole model exact. With real branches the model equals no source
(N6); forcing gate j and FFN expert j and restoring source j's own norms, embeddings and head
gives source j back (F8).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from upcycle.errors import UpcycleError
from upcycle.model.config import MoAConfig, ModelConfig, StrictModel
from upcycle.model.moa import stack_attention_experts
from upcycle.recipes.base import (
    FFN_MATRIX,
    MoEParams,
    SourceModel,
    UpcycleRecipe,
    dense_ffn_matrix,
    new_router,
)
from upcycle.recipes.btx import mean_of_sources
from upcycle.recipes.registry import register

# The FFN router of layer L is seeded with salt 0; any salt that is not a multiple of 1009 (the
# per-layer step of `new_router`) keeps every attention router's stream apart from them.
ATTENTION_ROUTER_SALT = 1

SEQUENTIAL_NOTE = (
    "; sequential BAM (soft attention experts, then the FFN MoE, each with its own norm), "
    "a deviation from the paper's parallel block (methods.md §9.5, §7.2 N8)"
)
CONVERTED_NOTE = (
    "; the sequential seed was rebuilt as BAM's parallel block (attention.convert_to_parallel), "
    "which changes its function (methods.md §7.2 N8): the mean input_layernorm is the shared norm "
    "and post_attention_layernorm is dropped"
)


class AttentionParams(StrictModel):
    """The `attention:` section of a bam convert YAML (attention experts, methods.md §4.2)."""

    share_kv: bool = Field(False, description="one W_k, W_v shared by the experts (shared-KV)")
    block: Literal["auto", "sequential", "parallel"] = Field(
        "auto", description="auto: the seed's block (parallel is BAM's; sequential is a deviation)"
    )
    convert_to_parallel: bool = Field(
        False, description="allow block: parallel on a sequential seed (changes the function, N8)"
    )
    routing: Literal["soft", "topk"] = Field("soft", description="soft is BAM's; topk the ablation")
    top_k: int | None = Field(None, gt=0, description="attention experts per token (routing: topk)")
    kv_init: Literal["mean", "seed"] = Field("mean", description="shared W_k, W_v: mean or the seed's")
    z_loss_coef: float = Field(0.0, ge=0, description="router z-loss of the attention router")
    layers: Literal["all"] | list[int] | None = Field(
        None, description="0-based layers with attention experts; default: the MoE layers"
    )

    @model_validator(mode="after")
    def _check(self) -> AttentionParams:
        if self.routing == "topk" and self.top_k is None:
            raise ValueError("attention.routing topk needs attention.top_k (attention experts per token)")
        if self.routing == "soft" and self.top_k is not None:
            raise ValueError("attention.top_k is only used by routing topk; remove it or set routing: topk")
        if self.kv_init == "seed" and not self.share_kv:
            raise ValueError(
                "attention.kv_init only applies with share_kv: true; set share_kv or remove kv_init"
            )
        if self.convert_to_parallel and self.block != "parallel":
            raise ValueError(
                "attention.convert_to_parallel only applies with block: parallel; set it or remove the flag"
            )
        return self


class BAMParams(MoEParams):
    num_experts: int | None = Field(None, gt=0, description="one expert per source; leave unset")
    top_k: int = Field(1, gt=0, description="FFN experts per token (BAM: top-1)")
    routing: Literal["topk_softmax", "softmax_topk", "soft", "sample_top1"] = Field(
        "softmax_topk", description="FFN routing; BAM: softmax then top-1, not renormalised"
    )
    renormalize: bool = Field(False, description="true makes a degenerate BAM exact (methods.md §9.1)")
    aux_loss_coef: float = Field(0.01, ge=0, description="Switch load balancing α (assumed, §9.2)")
    z_loss_coef: float = Field(1e-3, ge=0, description="FFN router z-loss β (assumed, §9.2)")
    attention: AttentionParams = Field(
        default_factory=AttentionParams, description="attention experts (see AttentionParams)"
    )


def dense_attention_name(expert_name: str) -> str:
    """The dense name under `self_attn.` that fills expert tensor `expert_name` (moa.py layout)."""
    if expert_name.endswith("_bias"):
        return expert_name.removesuffix("_bias") + ".bias"
    return expert_name if expert_name.endswith(".weight") else expert_name + ".weight"


@register
class BranchAttendMix(UpcycleRecipe):
    name = "bam"
    paper = "Zhang et al. 2024, BAM (Branch-Attend-Mix), https://arxiv.org/abs/2408.08274"
    summary = (
        "BTX plus attention experts: each branch's FFN and attention become experts (soft mixture "
        "of attention), everything else averaged, two new routers per layer"
    )
    Params: ClassVar = BAMParams
    min_sources = 2
    max_sources = None

    def __init__(self, params: BAMParams, sources: list[SourceModel]) -> None:
        super().__init__(params, sources)
        # The model card quotes `recipe.summary`: a deviation from the paper is stated there.
        if self.seed.config.block == "sequential":
            note = CONVERTED_NOTE if self.target.block == "parallel" else SEQUENTIAL_NOTE
            self.summary = type(self).summary + note

    def num_experts(self) -> int:
        count = len(self.sources)
        if self.params.num_experts not in (None, count):
            raise UpcycleError(
                f"bam makes one expert per source ({count}); remove num_experts or set it to {count}"
            )
        return count

    def block(self) -> str:
        requested = self.params.attention.block
        return self.seed.config.block if requested == "auto" else requested

    def attention_layers(self) -> Literal["all"] | list[int]:
        chosen = self.params.attention.layers
        if chosen is not None:
            return chosen
        if self.params.moe_layers == "all":
            return "all"
        return self.moe_section().layer_indices(self.seed.config.num_hidden_layers)

    def moa_section(self) -> MoAConfig:
        attention = self.params.attention
        if attention.top_k is not None and attention.top_k > self.num_experts():
            raise UpcycleError(
                f"attention.top_k ({attention.top_k}) exceeds the number of attention experts, one per "
                f"source ({self.num_experts()}); lower it"
            )
        return MoAConfig(
            num_experts=self.num_experts(),
            routing=attention.routing,
            top_k=attention.top_k,
            share_kv=attention.share_kv,
            z_loss_coef=attention.z_loss_coef,
            layers=self.attention_layers(),
        )

    def target_config(self) -> ModelConfig:
        data = super().target_config().model_dump()
        data["block"] = self.block()
        data["moa"] = self.moa_section().model_dump()
        return ModelConfig.model_validate(data)

    def validate(self) -> None:
        super().validate()
        seed_block, block = self.seed.config.block, self.target.block
        if (
            seed_block == "sequential"
            and block == "parallel"
            and not self.params.attention.convert_to_parallel
        ):
            raise UpcycleError(
                "attention.block parallel would change the function of this sequential seed (methods.md "
                "§7.2 N8); set attention.convert_to_parallel: true to accept that, or use block: auto"
            )
        if seed_block == "parallel" and block == "sequential":
            raise UpcycleError(
                "attention.block sequential would change the function of this parallel seed; "
                "use block: auto or parallel"
            )

    # -- tensors -------------------------------------------------------------------------------
    def shared_tensor(self, name: str) -> torch.Tensor:
        return mean_of_sources(self.sources, name)

    def expert_source(self, layer: int, which: FFN_MATRIX, expert: int) -> SourceModel:
        return self.sources[expert]

    def expert_matrix(self, layer: int, which: FFN_MATRIX, expert: int) -> torch.Tensor:
        return dense_ffn_matrix(self.sources[expert], layer, which)

    def attention_tensor(self, layer: int, name: str) -> torch.Tensor:
        """`self_attn.router.weight`, or one `self_attn.experts.*` tensor stacked over sources."""
        if name == "self_attn.router.weight":
            return new_router(
                self.params.router_init,
                layer,
                self.num_experts(),
                self.target.hidden_size,
                salt=ATTENTION_ROUTER_SALT,
            )
        expert_name = name.removeprefix("self_attn.experts.")
        dense_name = dense_attention_name(expert_name)
        per_source = [
            {dense_name: source.tensor(f"model.layers.{layer}.self_attn.{dense_name}")}
            for source in self.sources
        ]
        attention = self.params.attention
        return stack_attention_experts(per_source, attention.share_kv, attention.kv_init)[expert_name]
