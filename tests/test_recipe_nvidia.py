"""The `nvidia` recipe (methods.md §5): shards, virtual groups, weight scaling, refusals.

Exactness cases go through the CLI (`upcycle convert`) from an fp64 source and compare logits
with the dense model at atol 1e-10 (§7). Predicted deviations (N3, N4) and the homogeneous
activations, which need no YAML round trip, call `upcycle.convert` directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import assert_refused, run_cli
from hf_models import build_hf_model, padded_batch

import upcycle
from upcycle.model import Transformer
from upcycle.recipes.base import SourceModel
from upcycle.recipes.nvidia import NvidiaParams, NvidiaUpcycling, matrix_factors, output_scale

EXACT = 1e-10
F = 80  # intermediate_size of the tiny test models


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        return model(ids, mask).logits


def logits_at(folder: Path) -> torch.Tensor:
    return logits_of(upcycle.load_model(folder))


def write_config(folder: Path, name: str, source: Path, **params) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"recipe": "nvidia", "sources": [str(source)], **params}))
    return path


@pytest.fixture(scope="module")
def fp64_source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dense64")
    build_hf_model("llama").to(torch.float64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dense_logits(fp64_source) -> torch.Tensor:
    return logits_at(fp64_source)


TS = {"routing": "topk_softmax"}
ZERO_ST = {
    "routing": "softmax_topk",
    "router_init": {"std": 0.0},
    "granularity": 1,
    "num_experts": 8,
    "top_k": 2,
}


def convert_cli(folder: Path, source: Path, **params):
    """`upcycle convert` on a YAML with these recipe parameters: (CLI result, OUT_DIR)."""
    out = folder / "out"
    return run_cli("convert", write_config(folder, "nvidia", source, **params), out), out


def converted_logits(folder: Path, source: Path, **params) -> torch.Tensor:
    result, out = convert_cli(folder, source, **params)
    assert result.returncode == 0, result.stderr
    return logits_at(out)


# -- scale formulas (§5.3) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("experts", "granularity", "top_k", "scale_st", "cube_root", "square_root"),
    [
        (64, 8, 8, 64.0, 4.0, 8.0),  # E8G8T8
        (64, 8, 16, 32.0, 3.17, 5.66),  # E8G8T16
        (8, 1, 2, 4.0, 1.587, 2.0),  # E8G1T2
        (8, 1, 1, 8.0, 2.0, 2.83),  # E8G1T1
    ],
)
def test_worked_values_of_section_5_3(experts, granularity, top_k, scale_st, cube_root, square_root):
    s = output_scale("softmax_topk", False, experts, granularity, top_k)
    assert s == scale_st
    glu = matrix_factors("balanced", s, "silu", gated=True)
    assert glu["gate"] == glu["up"] == glu["down"] == pytest.approx(cube_root, abs=5e-3)
    plain = matrix_factors("balanced", s, "gelu", gated=False)
    assert plain["up"] == plain["down"] == pytest.approx(square_root, abs=5e-3)
    assert plain["gate"] == 1.0
    assert matrix_factors("balanced", s, "relu2", gated=False)["up"] == pytest.approx(cube_root, abs=5e-3)
    assert output_scale("topk_softmax", False, experts, granularity, top_k) == granularity
    assert output_scale("softmax_topk", True, experts, granularity, top_k) == granularity
    assert output_scale("soft", False, experts, granularity, experts) == granularity


def test_scaling_modes():
    assert matrix_factors("down_only", 4.0, "silu") == {"gate": 1.0, "up": 1.0, "down": 4.0}
    assert matrix_factors("none", 4.0, "silu") == {"gate": 1.0, "up": 1.0, "down": 1.0}
    # a gated squared ReLU is homogeneous of degree 4 (documented deviation from Megatron's cube root)
    assert matrix_factors("balanced", 16.0, "relu2", gated=True)["down"] == pytest.approx(2.0)


# -- layout: shards, copies, router ------------------------------------------------------------


def recipe(source: Path, **params) -> NvidiaUpcycling:
    return NvidiaUpcycling(NvidiaParams(**params), [SourceModel.open(source)])


def dense(source: SourceModel, which: str) -> torch.Tensor:
    return source.tensor(f"model.layers.1.mlp.{which}_proj.weight")


def test_defaults_and_target_config(fp64_source):
    built = recipe(fp64_source, granularity=4)
    moe = built.target.moe
    assert (moe.num_experts, moe.top_k, moe.granularity) == (32, 8, 4)
    assert (moe.routing, moe.aux_loss, moe.aux_loss_coef) == ("softmax_topk", "switch", 0.01)
    assert built.target.moe_intermediate_size == F // 4
    assert built.scale() == 32 * 4 / 8
    assert built.build("model.layers.0.mlp.experts.gate_up_proj").shape == (32, 2 * F // 4, 48)
    assert built.build("model.layers.0.mlp.experts.down_proj").shape == (32, 48, F // 4)


def test_shards_of_each_copy_concatenate_to_the_dense_ffn(fp64_source):
    G, N = 4, 12
    built = recipe(fp64_source, granularity=G, num_experts=N, top_k=4, weight_scaling="none")
    gate_up = built.build("model.layers.1.mlp.experts.gate_up_proj")
    down = built.build("model.layers.1.mlp.experts.down_proj")
    width = F // G
    for copy in range(N // G):
        experts = range(copy * G, (copy + 1) * G)
        assert torch.equal(torch.cat([gate_up[e, :width] for e in experts]), dense(built.seed, "gate"))
        assert torch.equal(torch.cat([gate_up[e, width:] for e in experts]), dense(built.seed, "up"))
        assert torch.equal(torch.cat([down[e] for e in experts], dim=1), dense(built.seed, "down"))


def test_balanced_and_down_only_scale_the_right_matrices(fp64_source):
    G, k = 2, 2
    s = 16 * G / k  # ST, N = 16
    shard_gate = dense(SourceModel.open(fp64_source), "gate")[F // G :]
    shard_down = dense(SourceModel.open(fp64_source), "down")[:, F // G :]
    balanced = recipe(fp64_source, granularity=G, top_k=k)
    a = s ** (1 / 3)
    assert torch.allclose(balanced.expert_matrix(1, "gate", 3), a * shard_gate, rtol=1e-15, atol=0)
    assert torch.allclose(balanced.expert_matrix(1, "down", 3), a * shard_down, rtol=1e-15, atol=0)
    down_only = recipe(fp64_source, granularity=G, top_k=k, weight_scaling="down_only")
    assert torch.equal(down_only.expert_matrix(1, "gate", 3), shard_gate)
    assert torch.allclose(down_only.expert_matrix(1, "down", 3), s * shard_down, rtol=1e-15, atol=0)


def test_virtual_group_router_repeats_each_row_over_a_copy(fp64_source):
    G = 4
    grouped = recipe(fp64_source, granularity=G).router(0)  # 32 experts
    assert grouped.shape == (32, 48)
    copies = grouped.view(8, G, 48)
    assert torch.equal(copies, copies[:, :1].expand_as(copies))
    assert len({tuple(row.tolist()) for row in copies[:, 0]}) == 8
    free = recipe(fp64_source, granularity=G, virtual_groups=False).router(0)
    assert len({tuple(row.tolist()) for row in free}) == 32


# -- function preservation through the CLI (§7) ----------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {**TS, "granularity": 2, "top_k": 2},
        {**TS, "granularity": 2, "top_k": 4},
        {**TS, "granularity": 4, "top_k": 4},
        {"routing": "softmax_topk", "renormalize": True, "granularity": 2, "top_k": 4},  # weights sum to 1
        {"routing": "soft", "granularity": 2, "num_experts": 8},  # ST with k = N: s = G
    ],
    ids=["ts_g2_k2", "ts_g2_k4", "ts_g4_k4", "st_renormalized", "soft"],
)
def test_virtual_groups_down_only_is_exact(fp64_source, dense_logits, tmp_path, params):
    """F4: top-k with k = m·G selects m whole copies whose weights sum to 1 (TS, renormalised ST;
    soft routing weighs all copies); s = G on W_down restores the dense FFN."""
    moe = converted_logits(tmp_path, fp64_source, **params, weight_scaling="down_only")
    torch.testing.assert_close(moe, dense_logits, rtol=0, atol=EXACT)


def test_st_zero_router_down_only_is_exact(fp64_source, dense_logits, tmp_path):
    """F3: every probability is 1/N; s = N/k on W_down undoes the k/N."""
    moe = converted_logits(tmp_path, fp64_source, **ZERO_ST, weight_scaling="down_only")
    torch.testing.assert_close(moe, dense_logits, rtol=0, atol=EXACT)


def test_st_zero_router_unscaled_shrinks_the_ffn_by_k_over_n(fp64_source, dense_logits, tmp_path):
    """N1, predicted exactly: unscaled ST with uniform probabilities outputs (k/N)·FFN in every layer."""
    moe_logits = converted_logits(tmp_path, fp64_source, **ZERO_ST, weight_scaling="none")
    shrunk = upcycle.load_model(fp64_source)
    with torch.no_grad():
        for name, parameter in shrunk.named_parameters():
            if name.endswith("mlp.down_proj.weight"):
                parameter.mul_(2 / 8)
    torch.testing.assert_close(moe_logits, logits_of(shrunk), rtol=0, atol=EXACT)
    assert (moe_logits - dense_logits).abs().max() > 1e-3  # the deviation is real


# -- predicted deviations, in process ----------------------------------------------------------


def converted_in_process(tmp_path: Path, source: Path, name: str, **params) -> torch.Tensor:
    out = upcycle.convert({"recipe": "nvidia", "sources": [str(source)], **params}, tmp_path / name)
    return logits_at(out)


def test_balanced_scaling_is_approximate_on_swiglu(fp64_source, dense_logits, tmp_path):
    """N4: silu(a·z) ≠ a·silu(z), so the cube-root split is not exact on SwiGLU (down_only is: F4)."""
    moe = converted_in_process(tmp_path, fp64_source, "balanced", **TS, granularity=2, top_k=2)
    assert (moe - dense_logits).abs().max() > 1e-6


def test_without_virtual_groups_the_function_is_lost(fp64_source, dense_logits, tmp_path):
    """N3: independent router rows let top-k mix shards of different copies with unequal weights."""
    moe = converted_in_process(
        tmp_path,
        fp64_source,
        "free",
        **TS,
        granularity=2,
        top_k=2,
        weight_scaling="down_only",
        virtual_groups=False,
    )
    assert (moe - dense_logits).abs().max() > 1e-6


def relu2_source(fp64_source: Path, folder: Path) -> Path:
    """The fp64 Llama weights under a gated squared-ReLU activation, saved natively."""
    llama = upcycle.load_model(fp64_source)
    config = llama.config.model_copy(update={"hidden_act": "relu2"})
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(llama.state_dict(), assign=True)
    return upcycle.save_native(model, folder)


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_balanced_scaling_is_exact_for_homogeneous_activations(fp64_source, tmp_path, activation):
    """F4: with ReGLU (degree 3) and gated squared ReLU (degree 4) the balanced split is exact under TS."""
    if activation == "relu":
        source = tmp_path / "reglu"
        build_hf_model("llama", hidden_act="relu").to(torch.float64).save_pretrained(source)
    else:
        source = relu2_source(fp64_source, tmp_path / "relu2")
    params = {**TS, "granularity": 2, "top_k": 4, "num_experts": 8}
    factor = math.pow(2, 1 / (3 if activation == "relu" else 4))  # s = G = 2 split over the degree
    assert recipe(source, **params).factors == pytest.approx({"gate": factor, "up": factor, "down": factor})
    moe = converted_in_process(tmp_path, source, "balanced", **params)
    torch.testing.assert_close(moe, logits_at(source), rtol=0, atol=EXACT)


# -- refusals through the CLI --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "fragments"),
    [
        ({"num_experts": 4, "top_k": 6}, ("top_k (6) exceeds num_experts (4)", "lower top_k")),
        ({"granularity": 2, "top_k": 3}, ("top_k (3) must be a multiple of granularity (2)",)),
        ({"granularity": 3}, ("granularity (3) must divide the dense intermediate_size (80)",)),
        ({"granularity": 4, "num_experts": 6}, ("num_experts (6) must be a multiple of granularity (4)",)),
        ({"routing": "sample_top1", "top_k": 1}, ("no weight-scaling rule for sample_top1",)),
    ],
)
def test_refusals(fp64_source, tmp_path, params, fragments):
    result, out = convert_cli(tmp_path, fp64_source, **params)
    assert_refused(result, *fragments)
    assert not out.exists()
