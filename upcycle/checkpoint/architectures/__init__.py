"""Architecture adapters as data: one YAML file per HF family beside this module.

Each file says which HF `model_type`s it covers, how the family's flags map onto `ModelConfig`
(bias on q/k/v and o, QK-norm), when the sliding window applies, and any tensor renames from HF
names to native names (the dense families need none: the native names are the HF Llama names).
Adding a family that fits the Llama layout is one new YAML file.

MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE) add a `moe:` block (`MoEFamily`): which config keys
hold the expert count, top-k and expert width, what the router computes, where the MoE layers
are, whether a gated shared expert exists. Their renames bring the per-expert tensor keys to the
classic form `model.layers.L.mlp.experts.N.{gate,up,down}_proj.weight`, which the loader stacks
(`upcycle.checkpoint.loading`); exports (`upcycle.checkpoint.hf_moe`) read the same files.

`model_config_from_hf(dict)` reads an HF `config.json` (both the transformers 4 keys `rope_theta`
/ `rope_scaling` and the transformers 5 key `rope_parameters`); `hf_config_from_model_config`
writes one back.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from upcycle.errors import UpcycleError
from upcycle.model.config import ModelConfig, MoEConfig, RopeConfig

# ModelConfig field -> HF config key, shared by every supported family.
COMMON_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
HF_ACTIVATIONS_OUT = {
    "silu": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
    "relu2": "relu2",
}
SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class MoEFamily:
    """The `moe:` block of an HF MoE family (field meanings in the YAML files' comments)."""

    # num_experts, top_k, intermediate_size (one expert), aux_loss_coef -> HF key(s); where a
    # field has several keys, the first present is read and exports write the first.
    keys: dict[str, tuple[str, ...]]
    routing: str  # what the HF router computes: topk_softmax or softmax_topk
    renormalize_key: str | None  # HF flag that renormalises softmax_topk; None: routing is fixed
    layers: str  # `all`, or `sparse_step` (decoder_sparse_step and mlp_only_layers)
    shared_expert_key: str | None  # HF key of the sigmoid-gated shared expert's width; None: none
    activations: tuple[str, ...]
    fixed: dict[str, Any]  # config keys exports write as they are


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    hf_architecture: str
    flags: dict[str, dict[str, Any]]
    sliding_window: str
    tensor_renames: dict[str, str]
    moe: MoEFamily | None = None
    export_requires: tuple[str, ...] = ()


@cache
def architectures() -> dict[str, Architecture]:
    """All adapters, keyed by HF model_type."""
    found: dict[str, Architecture] = {}
    for item in sorted(resources.files(__package__).iterdir(), key=lambda p: p.name):
        if not item.name.endswith(".yaml"):
            continue
        data = yaml.safe_load(item.read_text())
        arch = Architecture(
            name=data["name"],
            model_types=tuple(data["model_types"]),
            hf_architecture=data["hf_architecture"],
            flags=data["flags"],
            sliding_window=data["sliding_window"],
            tensor_renames=data.get("tensor_renames") or {},
            moe=_moe_family(data["moe"]) if data.get("moe") else None,
            export_requires=tuple(data.get("export_requires") or ()),
        )
        for model_type in arch.model_types:
            found[model_type] = arch
    return found


def _moe_family(data: dict[str, Any]) -> MoEFamily:
    return MoEFamily(
        keys={field: (key,) if isinstance(key, str) else tuple(key) for field, key in data["keys"].items()},
        routing=data["routing"],
        renormalize_key=data.get("renormalize_key"),
        layers=data["layers"],
        shared_expert_key=data.get("shared_expert_key"),
        activations=tuple(data["activations"]),
        fixed=dict(data.get("fixed") or {}),
    )


def supported_model_types() -> list[str]:
    return sorted(architectures())


def architecture_for(model_type: str | None) -> Architecture:
    arch = architectures().get(model_type or "")
    if arch is None:
        raise UpcycleError(
            f"architecture {model_type!r} is not supported; supported model types are "
            f"{', '.join(supported_model_types())} (or an upcycle native checkpoint)"
        )
    return arch


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = hf.get("rope_parameters")
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise UpcycleError(f"key {key} must be a JSON object; fix or re-create config.json")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise UpcycleError("per-layer rope_parameters are not supported; use a single RoPE configuration")
    scaling = dict(params or hf.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE:
        raise UpcycleError(
            f"RoPE scaling {rope_type!r} is not supported; supported types are {', '.join(SUPPORTED_ROPE)}"
        )
    fields = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor") if k in scaling}
    if "original_max_position_embeddings" in scaling:
        fields["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return RopeConfig(theta=theta, type=rope_type, **fields)


def _flag(arch: Architecture, name: str, hf: dict[str, Any]) -> bool:
    rule = arch.flags[name]
    return bool(rule["value"]) if "value" in rule else bool(hf.get(rule["key"], rule["default"]))


def _sliding_window(arch: Architecture, hf: dict[str, Any]) -> int | None:
    if arch.sliding_window == "none":
        return None
    if arch.sliding_window == "unsupported":
        if hf.get("use_sliding_window"):
            raise UpcycleError(
                f"{arch.name} sliding windows (use_sliding_window) are not supported; "
                "set use_sliding_window to false in config.json"
            )
        return None
    if arch.sliding_window == "use_sliding_window" and not hf.get("use_sliding_window", False):
        return None
    window = hf.get("sliding_window")
    layers_with_window = hf.get("max_window_layers")
    if window and layers_with_window is not None and layers_with_window < hf["num_hidden_layers"]:
        raise UpcycleError(
            "sliding windows on only some layers (max_window_layers) are not supported; "
            "set use_sliding_window to false or use a model with one window for all layers"
        )
    return window or None


def moe_layers_from_hf(family: MoEFamily, hf: dict[str, Any]) -> list[int]:
    """0-based indices of the MoE layers of an HF MoE config."""
    num_layers = hf["num_hidden_layers"]
    if family.layers == "all":
        return list(range(num_layers))
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or ())
    return [i for i in range(num_layers) if (i + 1) % step == 0 and i not in dense]


def _moe_value(family: MoEFamily, field: str, hf: dict[str, Any]) -> Any:
    return next((hf[key] for key in family.keys[field] if hf.get(key) is not None), None)


def _moe_from_hf(family: MoEFamily, hf: dict[str, Any]) -> MoEConfig | None:
    num_experts = _moe_value(family, "num_experts", hf) or 0
    layers = moe_layers_from_hf(family, hf) if num_experts > 0 else []
    if not layers:
        return None  # a dense model of an MoE family
    shared_width = hf.get(family.shared_expert_key) if family.shared_expert_key else None
    aux_loss_coef = _moe_value(family, "aux_loss_coef", hf)
    return MoEConfig(
        num_experts=num_experts,
        top_k=_moe_value(family, "top_k", hf),
        routing=family.routing,
        renormalize=bool(hf.get(family.renormalize_key, False)) if family.renormalize_key else False,
        intermediate_size=_moe_value(family, "intermediate_size", hf),
        num_shared_experts=1 if shared_width else 0,
        shared_intermediate_size=shared_width or None,
        shared_expert_gate=bool(shared_width),
        aux_loss="switch",  # transformers' load_balancing_loss_func is the Switch form
        **({"aux_loss_coef": aux_loss_coef} if aux_loss_coef is not None else {}),
        layers="all" if len(layers) == hf["num_hidden_layers"] else layers,
    )


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from an HF config.json dict of a supported family."""
    arch = architecture_for(hf.get("model_type"))
    act = hf.get("hidden_act", "silu")
    if act not in HF_ACTIVATIONS:
        raise UpcycleError(f"activation {act!r} is not supported; supported: {', '.join(HF_ACTIVATIONS)}")
    fields = {ours: hf[theirs] for ours, theirs in COMMON_FIELDS.items() if hf.get(theirs) is not None}
    fields.setdefault("tie_word_embeddings", False)
    return ModelConfig(
        architecture=arch.name,
        hidden_act=HF_ACTIVATIONS[act],
        rope=_rope_from_hf(hf),
        sliding_window=_sliding_window(arch, hf),
        moe=_moe_from_hf(arch.moe, hf) if arch.moe is not None else None,
        **{name: _flag(arch, name, hf) for name in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm")},
        **fields,
    )


def hf_rope(rope: RopeConfig) -> dict[str, Any]:
    """RoPE in the transformers 5 `rope_parameters` form."""
    out: dict[str, Any] = {"rope_type": rope.type, "rope_theta": rope.theta}
    if rope.type in ("linear", "llama3"):
        out["factor"] = rope.factor
    if rope.type == "llama3":
        out.update(
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    return out


def hf_common_config(config: ModelConfig) -> dict[str, Any]:
    """The HF keys every family shares (used by exports and by the native config.json)."""
    out = {theirs: getattr(config, ours) for ours, theirs in COMMON_FIELDS.items()}
    out["num_key_value_heads"] = config.kv_heads
    out["head_dim"] = config.attention_head_dim
    out["hidden_act"] = HF_ACTIVATIONS_OUT[config.hidden_act]
    out["rope_parameters"] = hf_rope(config.rope)
    out["rope_theta"] = config.rope.theta
    return out
