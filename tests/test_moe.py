"""The MoE layer: grouped path against the eager reference, function preservation, capacity,
shared experts, config validation, and a whole Transformer with MoE layers (methods.md §1, §7).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from upcycle.kernels.grouped_moe import grouped_mm_available
from upcycle.model.block import build_attention, build_ffn
from upcycle.model.config import ModelConfig
from upcycle.model.mlp import GatedMLP, activation_fn
from upcycle.model.moe import MoE, PlainMLP
from upcycle.model.router import capacity_keep_mask, expert_capacity, select_top_k
from upcycle.model.transformer import Transformer

# Top-1 TS is legal (and exact) but untrainable; the config warns, which these tests know.
pytestmark = pytest.mark.filterwarnings("ignore:moe routing topk_softmax with top_k 1:UserWarning")

ROUTINGS = {
    "ts": {"routing": "topk_softmax"},
    "st": {"routing": "softmax_topk"},
    "st_renorm": {"routing": "softmax_topk", "renormalize": True},
    "soft": {"routing": "soft"},
}


def make_config(
    hidden: int = 16, dense_width: int = 32, layers: int = 2, layers_selection: object = None, **moe
) -> ModelConfig:
    if layers_selection is not None:
        moe["layers"] = layers_selection
    return ModelConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=dense_width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        moe=moe,
    )


def make_moe(config: ModelConfig, dtype: torch.dtype, seed: int, router_std: float = 1.0) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(config, 0).to(dtype)
    with torch.no_grad():
        layer.gate.weight.normal_(0.0, router_std)
    return layer


def run(layer: MoE, x: torch.Tensor, implementation: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the gradients of a loss that mixes the output and the aux losses."""
    layer.zero_grad(set_to_none=True)
    layer.implementation = implementation
    x = x.detach().clone().requires_grad_()
    out, aux = layer(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (torch.sum(out * weights) + sum(aux.values())).backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    grads["input"] = x.grad
    return out.detach(), grads


def assert_same_layer(layer: MoE, x: torch.Tensor, atol: float, grad_rtol: float) -> None:
    """Outputs within `atol`; every gradient (experts, router, shared, input) within tolerance."""
    out_eager, grads_eager = run(layer, x, "eager")
    out_grouped, grads_grouped = run(layer, x, "grouped")
    torch.testing.assert_close(out_grouped, out_eager, rtol=0, atol=atol)
    assert grads_eager.keys() == grads_grouped.keys()
    for name, grad in grads_eager.items():
        assert grad is not None and grads_grouped[name] is not None, name
        torch.testing.assert_close(grads_grouped[name], grad, rtol=grad_rtol, atol=atol, msg=name)


moe_case = st.fixed_dictionaries(
    {
        "routing": st.sampled_from(sorted(ROUTINGS)),
        "num_experts": st.integers(1, 9),
        "k_fraction": st.floats(0.0, 1.0),
        "width": st.sampled_from([4, 8, 12, 6]),  # 6 is not 16-byte aligned: the segment loop
        "tokens": st.integers(1, 13),
        "seed": st.integers(0, 2**16),
        "starve": st.booleans(),
    }
)


def build_case(case: dict, dtype: torch.dtype, **extra) -> tuple[MoE, torch.Tensor]:
    E = case["num_experts"]
    k = 1 + int(case["k_fraction"] * (E - 1))
    routing = ROUTINGS[case["routing"]]
    top_k = None if case["routing"] == "soft" else k
    config = make_config(hidden=8, dense_width=case["width"], num_experts=E, top_k=top_k, **routing, **extra)
    layer = make_moe(config, dtype, case["seed"])
    x = torch.randn(1, case["tokens"], 8, dtype=dtype, generator=torch.Generator().manual_seed(case["seed"]))
    if case["starve"] and E > 1:
        # Positive inputs and a strongly negative router row: expert 0 never wins a top-k slot.
        x = x.abs() + 0.1
        with torch.no_grad():
            layer.gate.weight[0] = -10.0
    return layer, x


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=moe_case)
def test_grouped_matches_eager_fp32(case: dict) -> None:
    layer, x = build_case(case, torch.float32, z_loss_coef=1e-3)
    # Outputs O(1): 1e-6 absolute. Gradients sum over tokens, so also 1e-5 relative (fp32 sums
    # in a different order: eager adds experts one by one, grouped sums each token's K slots).
    assert_same_layer(layer, x, atol=1e-6, grad_rtol=1e-5)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=moe_case, capacity=st.sampled_from([None, 0.5, 1.0]), aux=st.sampled_from(["switch", "btx"]))
def test_grouped_matches_eager_fp64(case: dict, capacity: float | None, aux: str) -> None:
    layer, x = build_case(case, torch.float64, capacity_factor=capacity, aux_loss=aux, z_loss_coef=1e-3)
    assert_same_layer(layer, x, atol=1e-12, grad_rtol=0)


@pytest.mark.parametrize("top_k", [1, 2, 8, 9])  # both ways of summing over K (K < 8 and K ≥ 8)
def test_grouped_matches_eager_for_each_combine(top_k: int) -> None:
    config = make_config(num_experts=9, top_k=top_k, routing="softmax_topk", z_loss_coef=1e-3)
    layer = make_moe(config, torch.float64, seed=top_k)
    assert_same_layer(layer, torch.randn(2, 11, 16, dtype=torch.float64), atol=1e-12, grad_rtol=0)


def test_grouped_path_uses_grouped_mm_where_available(monkeypatch: pytest.MonkeyPatch) -> None:
    if not grouped_mm_available("cpu", torch.float32, (16, 32)):
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    layer = make_moe(make_config(num_experts=8, top_k=2), torch.float32, seed=3)
    assert layer.resolved_implementation(torch.zeros(1, 16)) == "grouped"
    layer(torch.randn(2, 5, 16))
    assert calls == [torch.Size([20, 16]), torch.Size([20, 32])]
    assert not grouped_mm_available("cpu", torch.float64) and not grouped_mm_available(
        "cpu", torch.float32, (6,)
    )


def test_grouped_path_makes_no_host_sync_when_native(monkeypatch: pytest.MonkeyPatch) -> None:
    if not grouped_mm_available("cpu", torch.float32, (16, 32)):
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")

    def refuse(*args, **kwargs):
        raise AssertionError("host sync on the grouped path")

    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    layer = make_moe(
        make_config(num_experts=8, top_k=2, capacity_factor=1.0, z_loss_coef=1e-3), torch.float32, 4
    )
    layer.implementation = "grouped"
    out, aux = layer(torch.randn(2, 5, 16, requires_grad=True))
    (out.sum() + sum(aux.values())).backward()


# ---------------------------------------------------------------- function preservation (§7 F1, F2)


def dense_mlp(hidden: int, width: int, seed: int) -> GatedMLP:
    torch.manual_seed(seed)
    return GatedMLP(hidden, width, "silu").double()


def copy_dense_into_experts(layer: MoE, dense: GatedMLP) -> None:
    with torch.no_grad():
        gate_up = torch.cat([dense.gate_proj.weight, dense.up_proj.weight])  # gate rows first
        layer.experts.gate_up_proj.copy_(gate_up.expand_as(layer.experts.gate_up_proj))
        layer.experts.down_proj.copy_(dense.down_proj.weight.expand_as(layer.experts.down_proj))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    E=st.integers(1, 8),
    k_fraction=st.floats(0.0, 1.0),
    width=st.sampled_from([4, 8, 12]),
    tokens=st.integers(1, 12),
    routing=st.sampled_from(["ts", "soft", "st_renorm"]),
    implementation=st.sampled_from(["eager", "grouped"]),
    seed=st.integers(0, 2**16),
)
def test_copies_of_a_dense_ffn_equal_the_dense_ffn(
    E, k_fraction, width, tokens, routing, implementation, seed
):
    k = 1 + int(k_fraction * (E - 1))
    top_k = None if routing == "soft" else k
    config = make_config(hidden=8, dense_width=width, num_experts=E, top_k=top_k, **ROUTINGS[routing])
    layer = make_moe(config, torch.float64, seed)
    dense = dense_mlp(8, width, seed + 1)
    copy_dense_into_experts(layer, dense)
    layer.implementation = implementation
    x = torch.randn(3, tokens, 8, dtype=torch.float64)
    out, _ = layer(x)
    torch.testing.assert_close(out, dense(x), rtol=0, atol=1e-10)


def test_non_gated_copies_equal_the_dense_plain_mlp() -> None:
    config = ModelConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_act="relu2",
        moe={"num_experts": 4, "top_k": 2, "gated": False},
    )
    layer = make_moe(config, torch.float64, seed=5)
    torch.manual_seed(6)
    dense = PlainMLP(8, 12, "relu2").double()
    with torch.no_grad():
        layer.experts.up_proj.copy_(dense.up_proj.weight.expand_as(layer.experts.up_proj))
        layer.experts.down_proj.copy_(dense.down_proj.weight.expand_as(layer.experts.down_proj))
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    for implementation in ("eager", "grouped"):
        layer.implementation = implementation
        torch.testing.assert_close(layer(x)[0], dense(x), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- capacity and shared experts


def per_token_reference(layer: MoE, x_TD: torch.Tensor, keep_TK: torch.Tensor | None) -> torch.Tensor:
    """A third implementation: token by token, slot by slot, with plain matrix products."""
    routing = layer.gate(x_TD)
    act = activation_fn("silu")
    F = layer.experts.down_proj.shape[-1]
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for slot, expert in enumerate(routing.indices_TK[t].tolist()):
            if keep_TK is not None and not keep_TK[t, slot]:
                continue  # a dropped assignment contributes nothing
            w_in = layer.experts.gate_up_proj[expert]
            h = act(w_in[:F] @ x_TD[t]) * (w_in[F:] @ x_TD[t])
            y = y + routing.weights_TK[t, slot] * (layer.experts.down_proj[expert] @ h)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("implementation", ["eager", "grouped"])
@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
def test_capacity_drops_the_least_probable_assignments(implementation: str, factor: float) -> None:
    config = make_config(num_experts=4, top_k=2, routing="softmax_topk", capacity_factor=factor)
    layer = make_moe(config, torch.float64, seed=11, router_std=2.0)
    layer.implementation = implementation
    x_TD = torch.randn(24, 16, dtype=torch.float64)
    routing = layer.gate(x_TD)
    keep = capacity_keep_mask(routing.probs_TE, routing.indices_TK, expert_capacity(24, 2, factor, 4))
    assert (~keep).any(), "the case must drop something"
    out, _ = layer(x_TD[None])
    torch.testing.assert_close(out[0], per_token_reference(layer, x_TD, keep), rtol=0, atol=1e-12)


def test_large_capacity_equals_dropless() -> None:
    config = make_config(num_experts=4, top_k=2, capacity_factor=2.0)  # CF ≥ N/k: nothing can drop
    layer = make_moe(config, torch.float64, seed=12)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with_capacity = layer(x)[0]
    layer.capacity_factor = None
    torch.testing.assert_close(with_capacity, layer(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("gated_shared", [False, True])
def test_shared_experts_are_always_on_with_optional_sigmoid_gate(gated_shared: bool) -> None:
    config = make_config(
        num_experts=4,
        top_k=2,
        num_shared_experts=2,
        shared_intermediate_size=8,
        shared_expert_gate=gated_shared,
    )
    layer = make_moe(config, torch.float64, seed=13)
    assert layer.shared_expert.gate_proj.weight.shape == (16, 16)  # 2 shared experts of width 8, fused
    x_TD = torch.randn(10, 16, dtype=torch.float64)
    shared = layer.shared_expert(x_TD)
    if gated_shared:
        shared = torch.sigmoid(x_TD @ layer.shared_expert_gate.weight.T) * shared
    expected = per_token_reference(layer, x_TD, None) + shared
    for implementation in ("eager", "grouped"):
        layer.implementation = implementation
        torch.testing.assert_close(layer(x_TD[None])[0][0], expected, rtol=0, atol=1e-12)


def test_expert_load_counts_the_last_call() -> None:
    layer = make_moe(make_config(num_experts=5, top_k=2), torch.float32, seed=14)
    x = torch.randn(3, 7, 16, requires_grad=True)
    layer(x)
    routing = layer.gate(x.reshape(-1, 16))
    expected = torch.bincount(routing.indices_TK.reshape(-1), minlength=5)
    assert torch.equal(layer.expert_load, expected) and int(layer.expert_load.sum()) == 42
    assert not layer.expert_load.requires_grad


def test_aux_losses_are_scaled_and_zero_coefficients_omitted() -> None:
    layer = make_moe(
        make_config(num_experts=4, top_k=2, aux_loss_coef=0.0, z_loss_coef=0.0), torch.float32, 15
    )
    assert layer(torch.randn(1, 4, 16))[1] == {}
    layer = make_moe(make_config(num_experts=4, top_k=2, aux_loss="btx", z_loss_coef=0.5), torch.float64, 15)
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    _, aux = layer(x)
    logits = x[0] @ layer.gate.weight.T
    assert set(aux) == {"moe_load_balancing", "moe_z_loss"}
    torch.testing.assert_close(
        aux["moe_z_loss"], 0.5 * torch.logsumexp(logits, -1).square().mean(), rtol=0, atol=1e-14
    )


def test_sample_top1_routes_the_first_moe_layer_softly() -> None:
    config = make_config(layers=4, num_experts=4, routing="sample_top1", layers_selection=None)
    assert build_ffn(config, 0).gate.routing == "soft"
    assert build_ffn(config, 1).gate.routing == "sample_top1"
    assert build_ffn(config, 1).top_k == 1


# ---------------------------------------------------------------- the whole model


def test_transformer_with_moe_layers_runs_and_reports_every_aux_loss() -> None:
    config = make_config(layers=4, num_experts=4, top_k=2, z_loss_coef=1e-3, layers_selection="every_other")
    torch.manual_seed(0)
    model = Transformer(config)
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == [
        "GatedMLP",
        "MoE",
        "GatedMLP",
        "MoE",
    ]
    ids = torch.randint(0, 64, (2, 6))
    output = model(ids)
    assert set(output.aux_losses) == {
        "layers.1.moe_load_balancing",
        "layers.1.moe_z_loss",
        "layers.3.moe_load_balancing",
        "layers.3.moe_z_loss",
    }
    loss = torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), ids.flatten()) + sum(
        output.aux_losses.values()
    )
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_moe_layer_selection_and_moa_builder() -> None:
    config = make_config(layers=5, num_experts=2, top_k=1, routing="softmax_topk", layers_selection=[0, 3])
    assert [config.is_moe_layer(i) for i in range(5)] == [True, False, False, True, False]
    config = ModelConfig(**{**config.model_dump(), "moa": {"num_experts": 2, "layers": [2]}})
    assert ModelConfig.model_validate_json(config.model_dump_json()) == config
    pytest.importorskip("upcycle.model.moa")
    assert type(build_attention(config, 2)).__name__ == "MixtureOfAttention"
    assert type(build_attention(config, 1)).__name__ == "Attention"


def test_bam_like_transformer_keeps_both_routers_losses() -> None:
    pytest.importorskip("upcycle.model.moa")
    config = ModelConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        block="parallel",
        moa={"num_experts": 3, "z_loss_coef": 1e-3},
        moe={"num_experts": 4, "top_k": 1, "routing": "softmax_topk", "z_loss_coef": 1e-3},
    )
    torch.manual_seed(1)
    model = Transformer(config)
    output = model(torch.randint(0, 64, (2, 5)))
    for layer in range(2):
        assert {f"layers.{layer}.{name}" for name in ("moe_load_balancing", "moe_z_loss")} <= set(
            output.aux_losses
        )
    (output.logits.square().mean() + sum(output.aux_losses.values())).backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- config validation


def model_with(moe: dict | None = None, moa: dict | None = None, **dense) -> ModelConfig:
    fields = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 24, "num_hidden_layers": 4}
    return ModelConfig(num_attention_heads=2, **{**fields, **dense}, moe=moe, moa=moa)


@pytest.mark.parametrize(
    ("sections", "fix"),
    [
        ({"moe": {"num_experts": 4, "top_k": 5}}, "lower top_k or add experts"),
        ({"moe": {"num_experts": 4}}, "needs moe.top_k"),
        ({"moe": {"num_experts": 4, "routing": "soft", "top_k": 2}}, "remove moe.top_k"),
        ({"moe": {"num_experts": 4, "routing": "sample_top1", "top_k": 2}}, "set moe.top_k to 1"),
        ({"moe": {"num_experts": 6, "top_k": 2, "granularity": 4}}, "multiple of moe.granularity"),
        ({"moe": {"num_experts": 10, "top_k": 2, "granularity": 5}}, "pick a granularity that divides it"),
        ({"moe": {"num_experts": 8, "top_k": 2, "granularity": 2, "intermediate_size": 6}}, "must equal"),
        ({"moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 0}}, "greater than 0"),
        ({"moe": {"num_experts": 4, "top_k": 2, "layers": [1, 4]}}, "outside 0..3"),
        ({"moe": {"num_experts": 4, "top_k": 2, "layers": []}}, "remove the moe section"),
        ({"moe": {"num_experts": 4, "top_k": 2, "layers": [1, 1]}}, "list each layer once"),
        ({"moe": {"num_experts": 4, "top_k": 2, "renormalize": True}}, "set routing: softmax_topk"),
        ({"moe": {"num_experts": 4, "top_k": 2, "shared_expert_gate": True}}, "set num_shared_experts"),
        ({"moe": {"num_experts": 4, "top_k": 2}, "mlp_bias": True}, "set mlp_bias false"),
        (
            {"moe": {"num_experts": 4, "top_k": 2, "layers": "every_other"}, "num_hidden_layers": 1},
            "use layers",
        ),
        ({"moa": {"num_experts": 4, "routing": "topk"}}, "needs moa.top_k"),
        ({"moa": {"num_experts": 4, "routing": "topk", "top_k": 5}}, "lower top_k"),
        ({"moa": {"num_experts": 4, "top_k": 2}}, "set moa.routing: topk"),
        ({"moa": {"num_experts": 4, "layers": [-1]}}, "fix the indices"),
    ],
)
def test_bad_sections_are_refused_with_the_fix(sections: dict, fix: str) -> None:
    with pytest.raises(ValidationError, match=fix):
        model_with(**sections)


def test_defaults_and_derived_widths() -> None:
    config = model_with(moe={"num_experts": 8, "top_k": 2, "granularity": 4, "num_shared_experts": 1})
    assert config.moe_intermediate_size == 6 and config.shared_expert_intermediate_size == 6
    assert config.moe.layer_indices(4) == [0, 1, 2, 3]
    assert model_with(moe={"num_experts": 2, "top_k": 1, "layers": "every_other"}).moe.layer_indices(4) == [
        1,
        3,
    ]
    with pytest.warns(UserWarning, match="no gradient"):
        model_with(moe={"num_experts": 2, "top_k": 1})


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_bf16_on_gpu_matches_fp32_reference_without_host_sync() -> None:
    device = torch.device("cuda")
    config = make_config(hidden=256, dense_width=512, num_experts=16, top_k=4, routing="softmax_topk")
    fast = make_moe(config, torch.float32, seed=21, router_std=0.02).to(device, torch.bfloat16)
    reference = make_moe(config, torch.float32, seed=21).to(device)
    reference.load_state_dict({name: value.float() for name, value in fast.state_dict().items()})
    x = torch.randn(4, 512, 256, device=device).to(torch.bfloat16)
    fast.implementation = "grouped"
    native = grouped_mm_available(device, torch.bfloat16, (256, 512))
    major, _ = torch.cuda.get_device_capability(device)
    assert native == (major in (9, 10)), f"grouped_mm on sm{major}x: {native}"
    assert not grouped_mm_available(device, torch.float32)
    torch.cuda.synchronize()
    if native:
        torch.cuda.set_sync_debug_mode("error")
    try:
        out, aux = fast(x.requires_grad_())
        (out.float().square().mean() + sum(aux.values())).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected, _ = reference(x.detach().float())
    error = float((out.detach().float() - expected).norm() / expected.norm())
    assert error < 1e-2, error
    assert torch.isfinite(fast.experts.gate_up_proj.grad).all() and torch.isfinite(x.grad).all()


def test_autocast_runs_the_experts_in_the_autocast_dtype():
    """Under bf16 autocast the experts see bf16 inputs and weights (so `auto` can pick the
    grouped kernel on a GPU), and the result matches the fp32 layer to bf16 precision."""
    config = ModelConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        moe={"num_experts": 4, "top_k": 2},
    )  # fmt: skip
    torch.manual_seed(0)
    layer = MoE(config)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.2)
    x_BSD = torch.randn(2, 8, 32)
    seen = []
    layer.experts.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    reference, _ = layer(x_BSD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = layer(x_BSD)
    assert seen == [torch.float32, torch.bfloat16]
    assert mixed.dtype == torch.bfloat16
    relative = (mixed.float() - reference).norm() / reference.norm()
    assert relative < 2e-2


def _top_k_by_python_sort(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """select_top_k's definition written out: NaN first, then by value, equal values by column."""

    def key(row: list[float], j: int) -> tuple:
        return (0, 0.0, j) if math.isnan(row[j]) else (1, -row[j], j)

    rows = scores_TE.double().tolist()
    return torch.tensor([sorted(range(len(row)), key=lambda j: key(row, j))[:k] for row in rows])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _scores_with_ties(rows: int, experts: int, device: str = "cpu") -> torch.Tensor:
    """Scores drawn from a few values (ties everywhere), some -inf, a row of -inf, a row of
    zeros and a row with two NaN: every case of select_top_k's order."""
    g = torch.Generator().manual_seed(experts)
    s = torch.randint(-3, 3, (rows, experts), generator=g).double() / 3
    s[s == -1] = -math.inf
    s[0, :] = -math.inf
    s[1, :] = 0.0
    s[2, 1], s[2, -1] = math.nan, math.nan
    return s.to(device)


@pytest.mark.parametrize("experts,k", [(8, 2), (64, 8), (4, 4), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_select_top_k_orders_ties_by_expert_eagerly_and_compiled(
    experts: int, k: int, dtype: torch.dtype
) -> None:
    """select_top_k (the router's torch.topk): the eager sort and the compiled argmax rounds both give
    the written-out order, values included, on ties, -inf and NaN."""
    torch._dynamo.reset()
    scores = _scores_with_ties(300, experts).to(dtype)
    expected = _top_k_by_python_sort(scores, k)
    compiled = torch.compile(select_top_k, fullgraph=True, dynamic=False)
    for values, indices in (select_top_k(scores, k), compiled(scores, k)):
        assert torch.equal(indices, expected)
        assert _same_bits(values, scores.gather(-1, expected))


def test_select_top_k_refuses_k_outside_the_scores_and_keeps_only_k_indices() -> None:
    """As torch.topk: 0 < k <= E, eagerly and compiled; the eager sort's [T, E] order is not what
    autograd keeps, only the [T, k] indices (contiguous) of the values' gather."""
    torch._dynamo.reset()
    scores = torch.tensor([[1.0, 3.0, 2.0]])
    for run in (select_top_k, torch.compile(select_top_k, fullgraph=True, dynamic=False)):
        for k in (0, 4):
            with pytest.raises(Exception, match="0 < k <= 3"):
                run(scores, k)
    saved = []
    scores = torch.randn(64, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        values, indices = select_top_k(scores, 2)
    assert indices.is_contiguous() and values.is_contiguous()
    assert [tuple(t.shape) for t in saved if t.dtype == torch.int64] == [(64, 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_select_top_k_orders_ties_by_expert_eagerly_and_compiled() -> None:
    torch._dynamo.reset()
    for experts, k in ((8, 2), (64, 8)):
        for dtype in (torch.float32, torch.bfloat16):
            scores = _scores_with_ties(4096, experts, "cuda").to(dtype)
            expected = _top_k_by_python_sort(scores.cpu(), k).cuda()
            compiled = torch.compile(select_top_k, fullgraph=True, dynamic=False)
            for values, indices in (select_top_k(scores, k), compiled(scores, k)):
                assert torch.equal(indices, expected), (experts, k, dtype)
                assert _same_bits(values, scores.gather(-1, expected))
