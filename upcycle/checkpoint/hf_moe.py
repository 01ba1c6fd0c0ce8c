"""Export targets for the Hugging Face MoE classes: `mixtral`, `qwen2_moe`, `qwen3_moe`.

Each target is the inverse of the loader's adapter for the same family: both read the family's
YAML file in `upcycle/checkpoint/architectures/` (config keys, what the router computes, where
the MoE layers are, the shared expert, attention flags, tensor renames), so importing what we
export gives back the same tensors (`torch.equal`, tested in tests/test_export.py).

On-disk layout: the classic per-expert keys. transformers 5 holds experts fused in memory
(`experts.gate_up_proj` [E, 2F, D], `experts.down_proj` [E, D, F]), but its `save_pretrained`
(checked with 5.17 and 5.23) still writes one tensor per expert matrix, and transformers 4,
vLLM and llama.cpp read only that form. We write exactly what `save_pretrained` writes:

| family | router | expert N of layer L |
|---|---|---|
| Mixtral | `model.layers.L.block_sparse_moe.gate.weight` [E, D] | `block_sparse_moe.experts.N.w1.weight` (W_gate [F, D]), `.w3.weight` (W_up [F, D]), `.w2.weight` (W_down [D, F]) |
| Qwen2-MoE, Qwen3-MoE | `model.layers.L.mlp.gate.weight` [E, D] | `mlp.experts.N.gate_proj.weight`, `.up_proj.weight`, `.down_proj.weight` |

plus, for Qwen2-MoE, `mlp.shared_expert.{gate,up,down}_proj.weight` and
`mlp.shared_expert_gate.weight` [1, D]. The plan slices each expert's matrix out of the native
stacked tensor (W_gate = rows 0..F-1 of `gate_up_proj[N]`, W_up = rows F..2F-1), so the engine
builds one stacked tensor at a time, as for the native format.

What each target holds, and the choices made (each refusal is one sentence from `supports`):
- Routing. Mixtral computes softmax → top-k → renormalise, which is topK-then-softmax (TS):
  it holds TS, and softmax-then-topK with `renormalize` (the same function; the two differ only
  by rounding). Qwen2/3-MoE compute softmax → top-k with `norm_topk_prob` = our `renormalize`;
  TS is written as `norm_topk_prob: true`. Re-importing reads Mixtral as TS and Qwen as ST.
  Soft and sample_top1 routing need the native format.
- Capacity factor: refused; the HF classes are dropless, so the function would change.
- Shared experts: only Qwen2-MoE has one, always multiplied by sigmoid(w·x), so it requires a
  gated shared expert. The native model holds n shared experts as one MLP of width n·F_shared
  (the same function), and they are written as Qwen2-MoE's one shared expert of that width.
- MoE layers: Mixtral has one in every layer; Qwen writes `decoder_sparse_step: 1` and lists
  the dense layers in `mlp_only_layers`. Fine-grained experts (granularity G) are plain experts
  of width F/G.
- Attention must match the class: Mixtral has no biases and no QK-norm; Qwen2-MoE has q/k/v
  biases and head_dim = hidden_size / heads (transformers 4, vLLM and llama.cpp hard-code both);
  Qwen3-MoE has QK-norm and one `attention_bias` flag for q, k, v and o.
- Experts: gated SiLU only (vLLM's fused experts for these classes compute nothing else).
- Losses: `router_aux_loss_coef` carries our coefficient; HF's balance loss is the Switch form,
  and a BTX-form loss or a z-loss does not change inference, so neither refuses.
  `output_router_logits` is false (serving); set it true to fine-tune with transformers, or its
  aux loss stays off.

Shape letters: E experts, F expert width, D model width.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import torch

from upcycle.checkpoint.architectures import Architecture, architecture_for, hf_common_config
from upcycle.checkpoint.export import (
    ExportTarget,
    OutputTensor,
    check_supported,
    get_export,
    register_export,
)
from upcycle.checkpoint.loading import _renamed, expert_matrix_name, open_checkpoint
from upcycle.checkpoint.native import DEFAULT_SHARD_BYTES
from upcycle.model.config import ModelConfig

STACKED_EXPERTS = re.compile(
    r"^(?P<experts>model\.layers\.\d+\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$"
)
FLAG_TEXT = {
    "qkv_bias": "q/k/v biases",
    "o_bias": "an attention output bias",
    "mlp_bias": "FFN biases",
    "qk_norm": "QK-norm",
}


def _expert_rows(stacked: torch.Tensor, *, expert: int, start: int, count: int) -> torch.Tensor:
    return stacked[expert, start : start + count]


def per_expert_outputs(
    name: str, shape: tuple[int, ...]
) -> list[tuple[str, tuple[int, ...], partial]] | None:
    """The per-expert matrices of a stacked native tensor (None when `name` is not one), in the
    classic layout: (name, shape, slice of the stacked tensor)."""
    match = STACKED_EXPERTS.match(name)
    if match is None:
        return None
    experts, (E, rows, cols) = match["experts"], shape
    if match["kind"] == "down_proj":
        parts = [("down", 0, rows)]
    else:
        parts = [("gate", 0, rows // 2), ("up", rows // 2, rows // 2)]
    return [
        (
            expert_matrix_name(experts, expert, which),
            (count, cols),
            partial(_expert_rows, expert=expert, start=start, count=count),
        )
        for expert in range(E)
        for which, start, count in parts
    ]


class HFMoEExport(ExportTarget):
    """An HF MoE class, described by the YAML adapter of the same name."""

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.description = description

    @property
    def arch(self) -> Architecture:
        return architecture_for(self.name)

    # -- what it can hold ----------------------------------------------------------------------
    def supports(self, config: ModelConfig) -> str | None:
        for check in (self._structure, self._routing, self._experts, self._layers, self._attention):
            reason = check(config)
            if reason is not None:
                return reason
        return None

    def _structure(self, config: ModelConfig) -> str | None:
        cls = self.arch.hf_architecture
        if config.moa is not None:
            return "no Hugging Face class holds attention experts (BAM); use the native format"
        if config.block != "sequential":
            return f"{cls} has sequential blocks but this model has a parallel block; use the native format"
        if config.moe is None:
            return f"{cls} holds MoE models and this one is dense; add a moe section or use the native format"
        return None

    def _routing(self, config: ModelConfig) -> str | None:
        cls, family, moe = self.arch.hf_architecture, self.arch.moe, config.moe
        if moe.routing not in ("topk_softmax", "softmax_topk"):
            return f"{cls} routes each token to its top-k experts, so {moe.routing} routing needs the native format"
        if moe.routing == "softmax_topk" and not moe.renormalize and family.renormalize_key is None:
            return (
                f"{cls} always renormalises the top-k weights, so it cannot hold softmax_topk routing "
                "without renormalize; export to qwen2_moe, qwen3_moe or native, or route with renormalize: true"
            )
        if moe.capacity_factor is not None:
            return (
                f"{cls} is dropless, so it cannot hold capacity_factor {moe.capacity_factor}; "
                "set capacity_factor to null or use the native format"
            )
        return None

    def _experts(self, config: ModelConfig) -> str | None:
        cls, family, moe = self.arch.hf_architecture, self.arch.moe, config.moe
        if not moe.gated:
            return f"{cls} experts are gated (SwiGLU) and this model's are not; use the native format"
        if config.hidden_act not in family.activations:
            return (
                f"{cls} experts use {', '.join(family.activations)} (what vLLM computes for this class) "
                f"but this model uses {config.hidden_act}; use the native format"
            )
        if family.shared_expert_key is None and moe.num_shared_experts:
            return f"{cls} has no shared expert; export to qwen2_moe (one gated shared expert) or native"
        if family.shared_expert_key is not None and not moe.num_shared_experts:
            return (
                f"{cls} always has a shared expert (with a sigmoid gate) and this model has none; "
                "export to qwen3_moe or mixtral, or add a gated shared expert"
            )
        if family.shared_expert_key is not None and not moe.shared_expert_gate:
            return (
                f"{cls} always multiplies its shared expert by a sigmoid gate and this model's shared expert "
                "is ungated; set shared_expert_gate: true or use the native format"
            )
        return None

    def _layers(self, config: ModelConfig) -> str | None:
        if self.arch.moe.layers == "all" and config.num_moe_layers() < config.num_hidden_layers:
            return (
                f"{self.arch.hf_architecture} has an MoE FFN in every layer and this model keeps dense "
                "layers; use moe_layers: all, or export to qwen2_moe or qwen3_moe"
            )
        return None

    def _attention(self, config: ModelConfig) -> str | None:
        arch, cls = self.arch, self.arch.hf_architecture
        by_key: dict[str, list[str]] = {}
        for field, rule in arch.flags.items():
            if "value" in rule and getattr(config, field) != bool(rule["value"]):
                has = "always has" if rule["value"] else "has no"
                return (
                    f"{cls} {has} {FLAG_TEXT[field]}, unlike this model; export to a format whose "
                    "attention matches the source, or native"
                )
            if "key" in rule:
                by_key.setdefault(rule["key"], []).append(field)
        for key, fields in by_key.items():
            if len({getattr(config, field) for field in fields}) > 1:
                texts = " and ".join(FLAG_TEXT[field] for field in fields)
                return f"{cls} sets {texts} with one flag ({key}) but this model has one without the other; use native"
        if "qkv_bias" in arch.export_requires and not config.qkv_bias:
            return (
                f"{cls} has q/k/v biases (transformers 4, vLLM and llama.cpp hard-code them), unlike this "
                "model; convert a Qwen2 source or use the native format"
            )
        derived = config.hidden_size // config.num_attention_heads
        if "derived_head_dim" in arch.export_requires and config.attention_head_dim != derived:
            return (
                f"{cls} readers take head_dim = hidden_size / num_attention_heads = {derived}, but this model's "
                f"is {config.attention_head_dim}; use the native format"
            )
        if config.sliding_window is not None and arch.sliding_window in ("none", "unsupported"):
            return f"{cls} cannot hold a sliding window on every layer; use the native format"
        return None

    # -- config.json -----------------------------------------------------------------------------
    def config_json(self, config: ModelConfig) -> dict[str, Any]:
        arch, family, moe = self.arch, self.arch.moe, config.moe
        out: dict[str, Any] = {
            "model_type": arch.model_types[0],
            "architectures": [arch.hf_architecture],
            **hf_common_config(config),
        }
        out.update(
            {rule["key"]: getattr(config, field) for field, rule in arch.flags.items() if "key" in rule}
        )
        out.update(self._window(config))
        out[family.keys["num_experts"][0]] = moe.num_experts
        out[family.keys["top_k"][0]] = moe.top_k
        out[family.keys["intermediate_size"][0]] = config.moe_intermediate_size
        out[family.keys["aux_loss_coef"][0]] = moe.aux_loss_coef
        if family.renormalize_key is not None:
            out[family.renormalize_key] = moe.routing == "topk_softmax" or moe.renormalize
        if family.shared_expert_key is not None:
            out[family.shared_expert_key] = config.shared_expert_intermediate_size
        if family.layers == "sparse_step":
            out["mlp_only_layers"] = [
                i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)
            ]
        out.update(family.fixed)
        return out

    def _window(self, config: ModelConfig) -> dict[str, Any]:
        mode = self.arch.sliding_window
        if mode == "always":
            return {"sliding_window": config.sliding_window}
        if mode in ("use_sliding_window", "unsupported"):
            return {
                "use_sliding_window": config.sliding_window is not None,
                "sliding_window": config.sliding_window,
            }
        return {}

    # -- tensors ---------------------------------------------------------------------------------
    def tensor_plan(
        self, config: ModelConfig, native_shapes: dict[str, tuple[int, ...]]
    ) -> list[OutputTensor]:
        outputs = []
        for name, shape in native_shapes.items():
            for canonical, out_shape, transform in per_expert_outputs(name, shape) or [(name, shape, None)]:
                outputs.append(OutputTensor(self.on_disk_name(canonical), out_shape, name, transform))
        return outputs

    def on_disk_name(self, name: str) -> str:
        """The family's name for a native (or classic per-expert) name: the YAML renames in reverse."""
        renames = self.arch.tensor_renames
        theirs = name
        for their_part, our_part in reversed(renames.items()):
            theirs = theirs.replace(our_part, their_part)
        if _renamed(theirs, renames) != name:
            raise RuntimeError(f"the tensor_renames of {self.name}.yaml do not invert for {name}")
        return theirs


for _name, _description in (
    (
        "mixtral",
        "Mixtral (MixtralForCausalLM): TS top-k routing, MoE in every layer, Llama/Mistral attention",
    ),
    ("qwen2_moe", "Qwen2-MoE: softmax-then-topK routing, one sigmoid-gated shared expert, q/k/v bias"),
    ("qwen3_moe", "Qwen3-MoE: softmax-then-topK routing, no shared expert, QK-norm"),
):
    register_export(HFMoEExport(_name, _description))


def export_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    format: str,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    quiet: bool = True,
) -> Path:
    """Write any loadable checkpoint (native, or HF dense or MoE) in the output `format`, through
    the streaming conversion engine: one native tensor in memory at a time, atomic output.

    `dtype` defaults to the dtype of the source's embedding.
    """
    from upcycle.checkpoint.convert import write_converted  # convert imports export, which imports us

    folder = Path(source)
    config, tensors = open_checkpoint(folder)
    export = get_export(format)
    check_supported(export, config)
    if dtype is None:
        dtype = tensors.get("model.embed_tokens.weight").dtype
    source_card = folder / "README.md"
    card = (
        f"Exported by upcycle from `{folder}` to the `{format}` format ({export.description}).\n\n"
        "Load it with `transformers.AutoModelForCausalLM.from_pretrained(PATH)`, or `upcycle.load_model(PATH)`."
    )
    if source_card.is_file():
        quoted = "\n".join(f"> {line}".rstrip() for line in source_card.read_text().splitlines())
        card += "\n\nThe source's model card:\n\n" + quoted
    return write_converted(
        config,
        tensors.get,
        export,
        out_dir,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        tokenizer_from=folder,
        recipe_yaml={"export": {"source": str(folder), "format": format}},
        model_card=card,
        overwrite=overwrite,
        quiet=quiet,
    )
