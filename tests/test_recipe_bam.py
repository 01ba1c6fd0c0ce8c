"""`upcycle convert` with the bam recipe (methods.md §4): exact wiring of FFN and attention
experts, the averages, exactness where §7.1 says exact (F7, F8), the predicted deviation where
§7.2 says not (N7), the parallel block, and refusals.

Every conversion goes through the CLI (`run_cli("convert", yaml, out)`). Sources are float64,
so "exact" means `torch.equal` for copied and averaged tensors and 1e-10 on logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import assert_refused, run_cli
from convert_helpers import fp64_source, max_logit_diff, write_yaml
from hf_models import TINY, padded_batch

import upcycle
from upcycle.model.config import ModelConfig
from upcycle.model.init import init_weights
from upcycle.model.router import Routing

LAYERS = range(TINY["num_hidden_layers"])
F = TINY["intermediate_size"]
# Expert tensor under `self_attn.experts.` -> the dense tensor under `self_attn.` it holds.
EXPERT_TO_DENSE = {
    "q_proj": "q_proj.weight",
    "k_proj": "k_proj.weight",
    "v_proj": "v_proj.weight",
    "o_proj": "o_proj.weight",
    "q_proj_bias": "q_proj.bias",
    "k_proj_bias": "k_proj.bias",
    "v_proj_bias": "v_proj.bias",
    "q_norm.weight": "q_norm.weight",
    "k_norm.weight": "k_norm.weight",
}
KV = {"k_proj", "v_proj", "k_proj_bias", "v_proj_bias", "k_norm.weight"}
AVERAGED = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{norm}.weight"
    for i in LAYERS
    for norm in ("input_layernorm", "post_attention_layernorm")
]


def parallel_source(folder: Path, seed: int) -> Path:
    """A native dense model with a parallel block (no HF family has one), random norms, fp64."""
    config = ModelConfig(
        **{k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")},
        num_attention_heads=TINY["num_attention_heads"],
        num_key_value_heads=TINY["num_key_value_heads"],
        block="parallel",
    )
    model = init_weights(upcycle.Transformer(config), std=0.1, seed=seed).to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator, dtype=torch.float64) + 0.5)
    return upcycle.save_native(model, folder)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("sources")
    return {
        "qwen2": [fp64_source(root / f"qwen2_{i}", "qwen2", seed=10 + i) for i in range(3)],
        "qwen3": [fp64_source(root / f"qwen3_{i}", "qwen3", seed=20 + i) for i in range(2)],
        "llama": [fp64_source(root / f"llama_{i}", "llama", seed=30 + i) for i in range(2)],
        "llama_6_heads": [fp64_source(root / "llama_6_heads", "llama", seed=40, num_attention_heads=6)],
        "parallel": [parallel_source(root / f"parallel_{i}", seed=50 + i) for i in range(3)],
    }


RANDOM_ROUTERS = {"router_init": {"std": 1.0, "seed": 7}}  # gates far from uniform


def bam_convert(out: Path, source_list: list[Path], **params) -> Path:
    """`upcycle convert` with the bam recipe through the CLI; returns OUT_DIR."""
    config = {"recipe": "bam", "sources": [str(s) for s in source_list], **params}
    result = run_cli("convert", write_yaml(out.with_suffix(".yaml"), config), out, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def qwen2_bam(sources, tmp_path_factory) -> Path:
    """The default conversion of three qwen2 branches (qkv biases), read by several tests."""
    return bam_convert(tmp_path_factory.mktemp("qwen2") / "bam", sources["qwen2"])


def states(folders: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [upcycle.load_model(folder).state_dict() for folder in folders]


def mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total / len(tensors)


def real_token_diff(a_BSV: torch.Tensor, b_BSV: torch.Tensor, mask_BS: torch.Tensor) -> float:
    return (a_BSV - b_BSV)[mask_BS.bool()].abs().max().item()


def assert_experts_are_sources(bam_state: dict, dense: list[dict], expert_names: set[str]) -> None:
    """Attention expert j and FFN expert j of every layer are source j's tensors, bit for bit."""
    for layer in LAYERS:
        prefix = f"model.layers.{layer}."
        for j, source in enumerate(dense):
            for name in expert_names:
                expected = source[prefix + "self_attn." + EXPERT_TO_DENSE[name]]
                assert torch.equal(bam_state[prefix + "self_attn.experts." + name][j], expected), (name, j)
            gate_up = bam_state[prefix + "mlp.experts.gate_up_proj"][j]
            assert torch.equal(gate_up[:F], source[prefix + "mlp.gate_proj.weight"])
            assert torch.equal(gate_up[F:], source[prefix + "mlp.up_proj.weight"])
            assert torch.equal(
                bam_state[prefix + "mlp.experts.down_proj"][j], source[prefix + "mlp.down_proj.weight"]
            )


def attention_expert_names(bam_state: dict, layer: int) -> set[str]:
    prefix = f"model.layers.{layer}.self_attn.experts."
    return {name.removeprefix(prefix) for name in bam_state if name.startswith(prefix)}


def test_expert_kv_copies_every_source_exactly(qwen2_bam, sources):
    """qwen2 sources: q/k/v/o and the q/k/v biases of attention expert j are source j's; FFN
    expert j is source j's FFN; embeddings, norms and head are the mean; the two routers of a
    layer are new, distinct, and seeded apart."""
    bam_state = upcycle.load_model(qwen2_bam).state_dict()
    dense = states(sources["qwen2"])
    names = {"q_proj", "k_proj", "v_proj", "o_proj", "q_proj_bias", "k_proj_bias", "v_proj_bias"}
    assert attention_expert_names(bam_state, 0) == names
    assert_experts_are_sources(bam_state, dense, names)
    for name in AVERAGED:
        assert torch.equal(bam_state[name], mean([d[name] for d in dense])), name
    for layer in LAYERS:
        attention_router = bam_state[f"model.layers.{layer}.self_attn.router.weight"]
        ffn_router = bam_state[f"model.layers.{layer}.mlp.gate.weight"]
        assert attention_router.shape == ffn_router.shape == (3, TINY["hidden_size"])
        assert not torch.equal(attention_router, ffn_router)
        assert 0.01 < attention_router.std().item() < 0.04 and 0.01 < ffn_router.std().item() < 0.04
    assert not torch.equal(
        bam_state["model.layers.0.mlp.gate.weight"], bam_state["model.layers.1.mlp.gate.weight"]
    )


def test_shared_kv_is_the_mean_of_the_sources(sources, tmp_path):
    out = bam_convert(tmp_path / "bam", sources["qwen2"], attention={"share_kv": True})
    bam_state = upcycle.load_model(out).state_dict()
    dense = states(sources["qwen2"])
    assert_experts_are_sources(bam_state, dense, {"q_proj", "o_proj", "q_proj_bias"})
    for layer in LAYERS:
        for name in ("k_proj", "v_proj", "k_proj_bias", "v_proj_bias"):
            shared = bam_state[f"model.layers.{layer}.self_attn.experts.{name}"]
            expected = mean([d[f"model.layers.{layer}.self_attn.{EXPERT_TO_DENSE[name]}"] for d in dense])
            assert torch.equal(shared, expected), (layer, name)


def test_qk_norm_weights_follow_their_experts(sources, tmp_path):
    """qwen3 sources: q_norm / k_norm are stacked per expert. moe_layers also chooses the
    attention-expert layers: a layer left dense has averaged attention and FFN."""
    dense = states(sources["qwen3"])
    layer1 = upcycle.load_model(bam_convert(tmp_path / "bam", sources["qwen3"], moe_layers=[1]))
    assert layer1.config.moa.layers == [1] and layer1.config.moe.layers == [1]
    state = layer1.state_dict()
    names = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm.weight", "k_norm.weight"}
    assert attention_expert_names(state, 1) == names and attention_expert_names(state, 0) == set()
    for j, source in enumerate(dense):
        for name in names:
            expected = source[f"model.layers.1.self_attn.{EXPERT_TO_DENSE[name]}"]
            assert torch.equal(state[f"model.layers.1.self_attn.experts.{name}"][j], expected), (name, j)
    for name in ("self_attn.q_proj.weight", "self_attn.k_norm.weight", "mlp.down_proj.weight"):
        assert torch.equal(
            state[f"model.layers.0.{name}"], mean([d[f"model.layers.0.{name}"] for d in dense])
        )


def test_kv_init_seed_takes_the_seeds_keys_and_values(sources, tmp_path):
    out = bam_convert(tmp_path / "bam", sources["qwen3"], attention={"share_kv": True, "kv_init": "seed"})
    state, dense = upcycle.load_model(out).state_dict(), states(sources["qwen3"])
    assert_experts_are_sources(state, dense, {"q_proj", "o_proj", "q_norm.weight"})
    for layer in LAYERS:
        for name in ("k_proj", "v_proj", "k_norm.weight"):
            expected = dense[0][f"model.layers.{layer}.self_attn.{EXPERT_TO_DENSE[name]}"]
            assert torch.equal(state[f"model.layers.{layer}.self_attn.experts.{name}"], expected), name


def test_defaults_and_the_sequential_deviation_in_the_model_card(qwen2_bam):
    config = upcycle.load_config(qwen2_bam)
    assert config.block == "sequential"
    ffn_keys = {"num_experts", "routing", "top_k", "renormalize", "aux_loss", "aux_loss_coef", "z_loss_coef"}
    assert config.moe.model_dump(include=ffn_keys) == {
        "num_experts": 3,
        "routing": "softmax_topk",
        "top_k": 1,
        "renormalize": False,
        "aux_loss": "switch",
        "aux_loss_coef": 0.01,
        "z_loss_coef": 1e-3,
    }
    attention_keys = {"num_experts", "routing", "share_kv", "z_loss_coef", "layers"}
    assert config.moa.model_dump(include=attention_keys) == {
        "num_experts": 3,
        "routing": "soft",
        "share_kv": False,
        "z_loss_coef": 0.0,
        "layers": "all",
    }
    card = (qwen2_bam / "README.md").read_text()
    assert "sequential BAM" in card and "deviation from the paper" in card


def test_f7_identical_sources_are_exact_with_an_exact_ffn(sources, tmp_path):
    """F7: soft MoA over identical experts is the dense attention (expert-KV and shared-KV);
    with ST top-1 renormalised, or soft FFN routing, the whole sequential BAM is the source."""
    seed = sources["llama"][0]
    expert_kv = bam_convert(tmp_path / "expert_kv", [seed] * 3, renormalize=True, **RANDOM_ROUTERS)
    shared_kv = bam_convert(
        tmp_path / "shared_kv", [seed] * 3, routing="soft", attention={"share_kv": True}, **RANDOM_ROUTERS
    )
    assert upcycle.load_config(shared_kv).moa.share_kv
    for out in (expert_kv, shared_kv):
        assert max_logit_diff(out, seed) <= 1e-10, out.name


def test_n7_default_ffn_outputs_p_max_times_the_ffn(sources, tmp_path):
    """N7: the default FFN (ST top-1, not renormalised) gives p_max·FFN. With zero routers
    p_max = 1/N exactly, so BAM equals the dense model with every W_down divided by N = 3."""
    seed = sources["llama"][0]
    bam = upcycle.load_model(bam_convert(tmp_path / "bam", [seed] * 3, router_init={"std": 0.0}))
    dense = upcycle.load_model(seed)
    ids, mask = padded_batch(TINY["vocab_size"], seed=1)
    with torch.no_grad():
        unscaled = dense(ids, mask).logits
        for layer in dense.model.layers:
            layer.mlp.down_proj.weight /= 3
        scaled = dense(ids, mask).logits
        got = bam(ids, mask).logits
    assert real_token_diff(got, scaled, mask) <= 1e-10
    assert real_token_diff(got, unscaled, mask) > 1e-3  # the deviation is real, not rounding


class FixedRouter(torch.nn.Module):
    """Stands in for an FFN router: every token goes to expert `index` with weight 1."""

    def __init__(self, index: int, num_experts: int) -> None:
        super().__init__()
        self.index, self.num_experts = index, num_experts

    def forward(self, x_TD: torch.Tensor) -> Routing:
        indices_TK = torch.full((x_TD.shape[0], 1), self.index, dtype=torch.long)
        probs_TE = torch.nn.functional.one_hot(indices_TK[:, 0], self.num_experts).to(x_TD.dtype)
        return Routing(torch.ones_like(indices_TK, dtype=x_TD.dtype), indices_TK, probs_TE, probs_TE)


def assert_each_source_recovered(bam_folder: Path, source_folders: list[Path]) -> None:
    """F8: gate one-hot on attention expert j, FFN routed to expert j with weight 1, and source
    j's own norms, embeddings and head swapped in: the model is source j."""
    ids, mask = padded_batch(TINY["vocab_size"], seed=1)
    reference = []
    for j, folder in enumerate(source_folders):
        bam, dense = upcycle.load_model(bam_folder), upcycle.load_model(folder)
        for layer in bam.model.layers:
            layer.self_attn.gate_override = torch.nn.functional.one_hot(torch.tensor(j), len(source_folders))
            layer.mlp.gate = FixedRouter(j, len(source_folders))
        own = {name: t for name, t in dense.state_dict().items() if name in bam.state_dict()}
        assert not any("self_attn" in name or ".mlp." in name for name in own)
        bam.load_state_dict(own, strict=False)
        with torch.no_grad():
            expected = dense(ids, mask).logits
            assert real_token_diff(bam(ids, mask).logits, expected, mask) <= 1e-10, j
        reference.append(expected)
    assert real_token_diff(reference[0], reference[1], mask) > 1e-3  # the sources really differ


def test_f8_each_source_is_recovered_sequential(qwen2_bam, sources):
    assert_each_source_recovered(qwen2_bam, sources["qwen2"])


def test_parallel_seed_keeps_the_parallel_block(sources, tmp_path):
    """A parallel seed gives BAM's own block (one shared norm), wired as before; F8 holds."""
    out = bam_convert(tmp_path / "bam", sources["parallel"])
    assert upcycle.load_config(out).block == "parallel"
    state = upcycle.load_model(out).state_dict()
    assert not any("post_attention_layernorm" in name for name in state)
    assert "deviation" not in (out / "README.md").read_text()
    dense = states(sources["parallel"])
    assert_experts_are_sources(state, dense, {"q_proj", "k_proj", "v_proj", "o_proj"})
    assert torch.equal(
        state["model.layers.1.input_layernorm.weight"],
        mean([d["model.layers.1.input_layernorm.weight"] for d in dense]),
    )
    assert_each_source_recovered(out, sources["parallel"])


def test_f7_on_a_parallel_seed(sources, tmp_path):
    seed = sources["parallel"][0]
    out = bam_convert(tmp_path / "bam", [seed] * 3, renormalize=True, **RANDOM_ROUTERS)
    assert upcycle.load_config(out).block == "parallel"
    assert max_logit_diff(out, seed) <= 1e-10


def test_convert_to_parallel_flag_rebuilds_the_block(sources, tmp_path):
    attention = {"block": "parallel", "convert_to_parallel": True}
    out = bam_convert(tmp_path / "bam", sources["llama"], attention=attention)
    assert upcycle.load_config(out).block == "parallel"
    state = upcycle.load_model(out).state_dict()
    assert not any("post_attention_layernorm" in name for name in state)
    dense = states(sources["llama"])
    name = "model.layers.0.input_layernorm.weight"
    assert torch.equal(state[name], mean([d[name] for d in dense]))
    assert "changes its function" in (out / "README.md").read_text()


# name -> (sources, extra YAML keys, fragments the one-sentence refusal must contain)
REFUSALS = {
    "one_source": (lambda s: s["llama"][:1], {}, ("at least 2", "sources")),
    "parallel_block_on_sequential_seed": (
        lambda s: s["llama"],
        {"attention": {"block": "parallel"}},
        ("convert_to_parallel", "N8"),
    ),
    "different_head_counts": (lambda s: [s["llama"][0], *s["llama_6_heads"]], {}, ("num_attention_heads",)),
    "kv_init_without_share_kv": (lambda s: s["llama"], {"attention": {"kv_init": "seed"}}, ("share_kv",)),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_through_the_cli(sources, tmp_path, name):
    """Exit 2, one sentence, no OUT_DIR."""
    pick_sources, extra, fragments = REFUSALS[name]
    config = {"recipe": "bam", "sources": [str(s) for s in pick_sources(sources)], **extra}
    out = tmp_path / "out"
    assert_refused(run_cli("convert", write_yaml(tmp_path / "c.yaml", config), out), *fragments)
    assert not out.exists()
