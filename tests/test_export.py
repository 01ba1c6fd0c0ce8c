"""HF MoE export targets (mixtral, qwen2_moe, qwen3_moe) and the matching imports.

- Export: a random native MoE model (distinct experts, random routers, norms and biases) written
  in each HF layout loads in transformers with no missing, unexpected or mismatched keys and
  gives our logits in fp32 within 1e-5 on a left-padded batch; routing is checked to be
  non-trivial. `upcycle.convert` writes the same layouts directly.
- Round trip: native -> HF -> native gives every tensor back `torch.equal`.
- Import: checkpoints written by transformers' own `save_pretrained` load into our model with
  HF's logits; the fused 3-D dialect loads too; a checkpoint missing an expert is refused.
- Refusals: `supports` gives one sentence per unholdable config; through the CLI, convert
  refuses with exit code 2 and leaves no output folder.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from cli_helpers import assert_refused, run_cli
from hf_models import TINY as HF_TINY
from hf_models import build_hf_model, padded_batch, save_hf_model
from safetensors.torch import load_file, save_file

import upcycle
from upcycle.checkpoint.export import get_export
from upcycle.checkpoint.hf_moe import export_checkpoint
from upcycle.model.init import init_weights

TINY = {**HF_TINY, "num_hidden_layers": 3}  # three layers, so that sparse-step layouts differ

# case -> (export format, HF class, native ModelConfig fields beyond TINY)
NATIVE_CASES = {
    "mixtral": (
        "mixtral",
        "MixtralForCausalLM",
        dict(
            architecture="mistral", sliding_window=5, moe=dict(num_experts=4, top_k=2, intermediate_size=32)
        ),
    ),
    "mixtral-renormalized-st": (
        "mixtral",
        "MixtralForCausalLM",
        dict(moe=dict(num_experts=4, top_k=2, routing="softmax_topk", renormalize=True)),
    ),
    "qwen2_moe": (
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        dict(
            architecture="qwen2",
            qkv_bias=True,
            moe=dict(
                num_experts=4,
                top_k=2,
                routing="softmax_topk",
                intermediate_size=24,
                num_shared_experts=2,  # held as one MLP: written as one shared expert of width 32
                shared_intermediate_size=16,
                shared_expert_gate=True,
                layers=[1, 2],
            ),
        ),
    ),
    "qwen3_moe": (
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        dict(
            architecture="qwen3",
            qk_norm=True,
            head_dim=16,
            tie_word_embeddings=True,
            moe=dict(
                num_experts=4, top_k=2, routing="topk_softmax", intermediate_size=24, layers="every_other"
            ),
        ),
    ),
}


def random_moe_model(fields: dict, seed: int = 0) -> upcycle.Transformer:
    """Random weights everywhere, with routers, norms and biases far from their defaults."""
    config = upcycle.ModelConfig(**{**TINY, **fields})
    model = init_weights(upcycle.Transformer(config), std=0.05, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            elif name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            elif name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval()


def load_hf(folder, class_name: str) -> transformers.PreTrainedModel:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    assert not problems, problems
    assert type(model).__name__ == class_name
    return model.float().eval()


def max_logit_gap(hf_model, ours, batch) -> float:
    ids, mask = batch
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, mask, positions).logits
    real = mask.bool()
    return (got[real] - expected[real]).abs().max().item()


@pytest.fixture(scope="module", params=sorted(NATIVE_CASES))
def exported(request, tmp_path_factory):
    """(case, native model, export folder)."""
    case = request.param
    fmt, _, fields = NATIVE_CASES[case]
    folder = tmp_path_factory.mktemp(case)
    model = random_moe_model(fields)
    upcycle.save_native(model, folder / "native")
    export_checkpoint(folder / "native", folder / fmt, fmt)
    return case, model, folder / fmt


def test_export_loads_in_transformers_with_our_logits(exported):
    case, model, out = exported
    fmt, class_name, _ = NATIVE_CASES[case]
    hf_model = load_hf(out, class_name)
    batch = padded_batch(TINY["vocab_size"])
    assert max_logit_gap(hf_model, model, batch) <= 1e-5
    moe = model.config.moe
    for index in moe.layer_indices(model.config.num_hidden_layers):
        used = int((model.model.layers[index].mlp.expert_load > 0).sum())
        assert used > moe.top_k, f"layer {index} routed every token to the same experts"
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == fmt and hf_config["output_router_logits"] is False


def test_native_to_hf_to_native_is_bitwise(exported):
    _, model, out = exported
    reloaded = upcycle.load_model(out)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    config, back = model.config, reloaded.config
    assert back.moe.layer_indices(3) == config.moe.layer_indices(3)
    assert back.moe_intermediate_size == config.moe_intermediate_size
    assert back.shared_expert_intermediate_size == config.shared_expert_intermediate_size
    assert back.sliding_window == config.sliding_window


def test_per_expert_keys_on_disk(exported):
    case, model, out = exported
    with open(out / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    names = set(header) - {"__metadata__"}
    if NATIVE_CASES[case][0] == "mixtral":
        expected = {f"model.layers.0.block_sparse_moe.experts.3.{w}.weight" for w in ("w1", "w2", "w3")}
        expected.add("model.layers.0.block_sparse_moe.gate.weight")
    else:
        layer = model.config.moe.layer_indices(3)[0]
        expected = {f"model.layers.{layer}.mlp.experts.3.{m}_proj.weight" for m in ("gate", "up", "down")}
        expected.add(f"model.layers.{layer}.mlp.gate.weight")
    assert expected <= names
    assert not any("gate_up_proj" in name or name.endswith("experts.down_proj") for name in names)


@pytest.mark.parametrize(
    ("family", "fmt", "class_name", "routing"),
    [
        ("llama", "mixtral", "MixtralForCausalLM", {}),
        ("qwen3", "qwen3_moe", "Qwen3MoeForCausalLM", {"routing": "softmax_topk"}),
    ],
)
def test_convert_writes_hf_moe_layouts(family, fmt, class_name, routing, tmp_path):
    source = save_hf_model(build_hf_model(family), tmp_path / family)
    recipe = {
        "recipe": "sparse",
        "sources": [str(source)],
        "num_experts": 4,
        "router_init": {"std": 0.5},
        **routing,
    }
    upcycle.convert({**recipe, "output": {"format": "native"}}, tmp_path / "native")
    upcycle.convert({**recipe, "output": {"format": fmt}}, tmp_path / fmt)
    ours = upcycle.load_model(tmp_path / "native")
    assert max_logit_gap(load_hf(tmp_path / fmt, class_name), ours, padded_batch(TINY["vocab_size"])) <= 1e-5


HF_MOE_CASES = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, sliding_window=6)),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        dict(
            num_experts=4,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            mlp_only_layers=[0],
            norm_topk_prob=True,
        ),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(num_experts=4, moe_intermediate_size=24, head_dim=16, decoder_sparse_step=2),
    ),
}


def hf_moe_model(family: str) -> transformers.PreTrainedModel:
    config_cls, extra = HF_MOE_CASES[family]
    config = config_cls(**{**TINY, "num_experts_per_tok": 2, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight") or name.endswith("norm.weight"):
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.5)
            elif name.endswith("bias") or "experts" in name or "shared_expert_gate" in name:
                parameter.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("family", sorted(HF_MOE_CASES))
def test_transformers_moe_checkpoints_load_with_their_logits(family, tmp_path):
    hf_model = hf_moe_model(family)
    hf_model.save_pretrained(tmp_path / "per_expert")
    ours = upcycle.load_model(tmp_path / "per_expert")
    batch = padded_batch(TINY["vocab_size"])
    assert max_logit_gap(hf_model, ours, batch) <= 1e-5
    expected_layers = {"mixtral": [0, 1, 2], "qwen2_moe": [1, 2], "qwen3_moe": [1]}[family]
    assert ours.config.moe.layer_indices(3) == expected_layers

    # transformers 5's in-memory names (fused 3-D experts), written as they are, load the same.
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, fused / "model.safetensors")
    again = upcycle.load_model(fused).state_dict()
    assert all(torch.equal(tensor, again[name]) for name, tensor in ours.state_dict().items())


def test_checkpoint_missing_an_expert_is_refused(tmp_path):
    hf_moe_model("qwen3_moe").save_pretrained(tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(upcycle.UpcycleError, match=r"lacks 1 tensor.*experts\.gate_up_proj"):
        upcycle.load_model(tmp_path / "q")


def _config(**fields) -> upcycle.ModelConfig:
    moe = {"num_experts": 4, "top_k": 2, **fields.pop("moe", {})}
    return upcycle.ModelConfig(**{**TINY, **fields, "moe": moe})


@pytest.mark.parametrize(
    ("fmt", "config", "fragment"),
    [
        ("mixtral", _config(moe={"routing": "softmax_topk"}), "without renormalize"),
        ("mixtral", _config(moe={"capacity_factor": 1.25}), "dropless"),
        ("mixtral", _config(moe={"layers": [1]}), "every layer"),
        ("mixtral", _config(moe={"num_shared_experts": 1}), "no shared expert"),
        ("mixtral", _config(qkv_bias=True), "q/k/v biases"),
        ("mixtral", _config(hidden_act="gelu"), "silu"),
        ("mixtral", _config(moe={"routing": "soft", "top_k": None}), "soft routing"),
        ("mixtral", _config(block="parallel"), "parallel block"),
        ("mixtral", _config(moa={"num_experts": 2}), "attention experts"),
        ("mixtral", upcycle.ModelConfig(**TINY), "dense"),
        ("qwen2_moe", _config(qkv_bias=True), "has none"),
        ("qwen2_moe", _config(qkv_bias=True, moe={"num_shared_experts": 1}), "sigmoid gate"),
        ("qwen2_moe", _config(moe={"num_shared_experts": 1, "shared_expert_gate": True}), "q/k/v biases"),
        (
            "qwen2_moe",
            _config(qkv_bias=True, head_dim=16, moe={"num_shared_experts": 1, "shared_expert_gate": True}),
            "head_dim",
        ),
        ("qwen3_moe", _config(), "QK-norm"),
        ("qwen3_moe", _config(qk_norm=True, qkv_bias=True), "one flag (attention_bias)"),
        ("qwen3_moe", _config(qk_norm=True, moe={"num_shared_experts": 1}), "no shared expert"),
    ],
)
def test_supports_names_the_reason(fmt, config, fragment):
    reason = get_export(fmt).supports(config)
    assert reason is not None and fragment in reason, reason
    assert reason.count(". ") == 0  # one sentence


def test_supports_accepts_what_the_class_holds():
    shared = {"num_shared_experts": 1, "shared_expert_gate": True}
    assert get_export("qwen2_moe").supports(_config(qkv_bias=True, moe=shared)) is None
    assert get_export("qwen3_moe").supports(_config(qk_norm=True, moe={"routing": "softmax_topk"})) is None
    assert get_export("mixtral").supports(_config(sliding_window=8)) is None
    assert get_export("qwen3_moe").supports(_config(qk_norm=True, qkv_bias=True, o_bias=True)) is None


@pytest.mark.parametrize(
    ("family", "fmt", "params", "fragments"),
    [
        ("llama", "mixtral", {"routing": "softmax_topk"}, ("output format mixtral", "renormalise")),
        ("llama", "qwen3_moe", {}, ("output format qwen3_moe", "QK-norm")),
        ("qwen2", "qwen2_moe", {}, ("output format qwen2_moe", "shared expert")),
    ],
)
def test_cli_refuses_unholdable_exports(family, fmt, params, fragments, tmp_path):
    source = save_hf_model(build_hf_model(family), tmp_path / family)
    config = tmp_path / "convert.yaml"
    config.write_text(
        yaml.safe_dump({"recipe": "sparse", "sources": [str(source)], **params, "output": {"format": fmt}})
    )
    out = tmp_path / "out"
    assert_refused(run_cli("convert", config, out), *fragments)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([family, "convert.yaml"])
