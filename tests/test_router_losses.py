"""Routing functions, capacity and auxiliary losses against hand derivations (methods.md §1).

The worked example: T = 2 tokens, E = 3 experts, logits chosen as logarithms of integers so that
every softmax is a fraction we can write down:

    token 0: l = log(1, 2, 5)   ->  p = (1/8, 2/8, 5/8),   logsumexp = log 8
    token 1: l = log(6, 1, 3)   ->  p = (6/10, 1/10, 3/10), logsumexp = log 10

Expected values are computed with `fractions.Fraction` and `math`, never with upcycle code.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from upcycle.model.losses import btx_load_balancing, router_z_loss, switch_load_balancing
from upcycle.model.router import (
    Router,
    capacity_keep_mask,
    expert_capacity,
    sample_top1,
    sample_top1_temperature,
    soft,
    softmax_topk,
    topk_softmax,
)

COUNTS = [[1, 2, 5], [6, 1, 3]]
PROBS = [[Fraction(c, sum(row)) for c in row] for row in COUNTS]
ALPHA, BETA = 0.01, 0.001


def worked_logits() -> torch.Tensor:
    return torch.tensor([[math.log(c) for c in row] for row in COUNTS], dtype=torch.float64)


def as_tensor(rows: list[list[Fraction]]) -> torch.Tensor:
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


def assert_exact(actual: torch.Tensor, expected: torch.Tensor | float) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-14)


# ---------------------------------------------------------------- routing functions, by hand


def test_topk_softmax_worked_example() -> None:
    routing = topk_softmax(worked_logits(), top_k=2)
    # token 0 keeps experts 2 and 1 (counts 5, 2): weights 5/7, 2/7; token 1 keeps 0 and 2: 6/9, 3/9.
    assert routing.indices_TK.tolist() == [[2, 1], [0, 2]]
    assert_exact(
        routing.weights_TK, as_tensor([[Fraction(5, 7), Fraction(2, 7)], [Fraction(6, 9), Fraction(3, 9)]])
    )
    assert_exact(routing.probs_TE, as_tensor(PROBS))


def test_softmax_topk_worked_example_and_renormalised() -> None:
    plain = softmax_topk(worked_logits(), top_k=2)
    assert plain.indices_TK.tolist() == [[2, 1], [0, 2]]
    assert_exact(
        plain.weights_TK, as_tensor([[Fraction(5, 8), Fraction(2, 8)], [Fraction(6, 10), Fraction(3, 10)]])
    )
    renormalised = softmax_topk(worked_logits(), top_k=2, renormalize=True)
    # (5/8, 2/8) / (7/8) = (5/7, 2/7): renormalised ST is TS.
    assert_exact(renormalised.weights_TK, topk_softmax(worked_logits(), 2).weights_TK)


def test_soft_routing_uses_every_expert() -> None:
    routing = soft(worked_logits())
    assert routing.indices_TK.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert_exact(routing.weights_TK, as_tensor(PROBS))


# ---------------------------------------------------------------- losses, by hand


def test_switch_loss_worked_example() -> None:
    routing = topk_softmax(worked_logits(), top_k=2)
    # Assignments (T·K = 4): expert 0 once, expert 1 once, expert 2 twice.
    f = [Fraction(1, 4), Fraction(1, 4), Fraction(2, 4)]
    P = [(PROBS[0][i] + PROBS[1][i]) / 2 for i in range(3)]
    assert [Fraction(29, 80), Fraction(7, 40), Fraction(37, 80)] == P
    expected = ALPHA * 3 * float(sum(fi * Pi for fi, Pi in zip(f, P, strict=True)))  # 0.01·3·117/320
    assert expected == pytest.approx(0.01 * 3 * 117 / 320, rel=1e-15)
    assert_exact(switch_load_balancing(routing.probs_TE, routing.indices_TK, ALPHA), expected)


def test_switch_loss_gradient_flows_through_probabilities_only() -> None:
    # d/dl_tj [α N Σ_i f_i P_i] = (α N / T) · p_tj · (f_j − Σ_i f_i p_ti), f held constant.
    logits = worked_logits().requires_grad_()
    routing = topk_softmax(logits, top_k=2)
    switch_load_balancing(routing.probs_TE, routing.indices_TK, ALPHA).backward()
    f = [Fraction(1, 4), Fraction(1, 4), Fraction(2, 4)]
    expected = [
        [
            ALPHA * 3 / 2 * float(p[j] * (f[j] - sum(fi * pi for fi, pi in zip(f, p, strict=True))))
            for j in range(3)
        ]
        for p in PROBS
    ]
    torch.testing.assert_close(logits.grad, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def test_btx_loss_worked_example() -> None:
    routing = topk_softmax(worked_logits(), top_k=2)
    # Dense gates after routing: token 0 (0, 2/7, 5/7), token 1 (6/9, 0, 3/9).
    gates = [[Fraction(0), Fraction(2, 7), Fraction(5, 7)], [Fraction(6, 9), Fraction(0), Fraction(3, 9)]]
    u = [(gates[0][i] + gates[1][i]) / 2 for i in range(3)]  # 1/3, 1/7, 11/21
    assert u == [Fraction(1, 3), Fraction(1, 7), Fraction(11, 21)]
    p = [(PROBS[0][i] + PROBS[1][i]) / 2 for i in range(3)]
    expected = ALPHA * 3 * float(sum(ui * pi for ui, pi in zip(u, p, strict=True)))
    loss = btx_load_balancing(routing.probs_TE, routing.weights_TK, routing.indices_TK, ALPHA)
    assert_exact(loss, expected)
    # And it is a different number from the Switch loss on the same routing (§9.9).
    assert abs(expected - 0.01 * 3 * 117 / 320) > 1e-4


def test_z_loss_worked_example() -> None:
    expected = BETA * (math.log(8) ** 2 + math.log(10) ** 2) / 2
    assert_exact(router_z_loss(worked_logits(), BETA), expected)


def test_losses_equal_alpha_under_uniform_routing() -> None:
    logits = torch.zeros(6, 4, dtype=torch.float64)
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3]])
    weights = torch.full((6, 2), 0.5, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    assert_exact(switch_load_balancing(probs, indices, ALPHA), ALPHA)
    assert_exact(btx_load_balancing(probs, weights, indices, ALPHA), ALPHA)


@pytest.mark.parametrize("loss", ["switch", "btx", "z"])
def test_loss_gradients_match_finite_differences(loss: str) -> None:
    # gradcheck perturbs the logits; the chosen experts stay put (no near-ties in this draw),
    # so the numerical derivative sees every differentiable path the formula has.
    logits = torch.randn(
        7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    ).requires_grad_()

    def value(logits_TE: torch.Tensor) -> torch.Tensor:
        routing = topk_softmax(logits_TE, top_k=2)
        if loss == "switch":
            return switch_load_balancing(routing.probs_TE, routing.indices_TK, ALPHA)
        if loss == "btx":
            return btx_load_balancing(routing.probs_TE, routing.weights_TK, routing.indices_TK, ALPHA)
        return router_z_loss(logits_TE, BETA)

    assert torch.autograd.gradcheck(value, (logits,), eps=1e-7, atol=1e-10, rtol=1e-6)


# ---------------------------------------------------------------- sample top-1


@pytest.mark.parametrize("step", [0, 1000, 5000, 6931, 6932, 10000, 10**6])
def test_sample_top1_temperature_schedule(step: int) -> None:
    expected = max(0.5, math.exp(-1e-4 * step))
    assert_exact(sample_top1_temperature(step), expected)


def test_sample_top1_training_keeps_largest_entry_of_soft_sample() -> None:
    logits = torch.tensor([[0.0, math.log(2), math.log(3)], [1.0, 0.0, -1.0]], dtype=torch.float64)
    gumbel = torch.tensor([[0.5, 0.0, -0.2], [-1.5, 0.3, 2.5]], dtype=torch.float64)
    tau = 0.5
    routing = sample_top1(logits, tau, training=True, gumbel_TE=gumbel)
    for t in range(2):
        scores = [math.exp((logits[t, j].item() + gumbel[t, j].item()) / tau) for j in range(3)]
        soft_sample = [s / sum(scores) for s in scores]
        best = max(range(3), key=lambda j: soft_sample[j])
        assert routing.indices_TK[t].tolist() == [best]
        assert routing.weights_TK[t, 0].item() == pytest.approx(soft_sample[best], rel=1e-14)
    # token 0: l+g = (0.5, 0.693, 0.899) -> expert 2; token 1: (-0.5, 0.3, 1.5) -> expert 2.
    assert routing.indices_TK[:, 0].tolist() == [2, 2]


def test_sample_top1_inference_is_a_hard_gumbel_max_sample() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    gumbel = torch.tensor([[-1.5, 0.3, 2.5]], dtype=torch.float64)
    routing = sample_top1(logits, 0.5, training=False, gumbel_TE=gumbel)
    assert routing.indices_TK.tolist() == [[2]] and routing.weights_TK.tolist() == [[1.0]]
    # Without fixed noise, hard samples are draws from softmax(l): frequencies within 1%.
    torch.manual_seed(0)
    many = torch.tensor([[math.log(1), math.log(2), math.log(7)]], dtype=torch.float64).expand(40000, 3)
    draws = sample_top1(many, 1.0, training=False).indices_TK[:, 0]
    frequencies = torch.bincount(draws, minlength=3).double() / 40000
    torch.testing.assert_close(
        frequencies, torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), rtol=0, atol=0.01
    )


def test_router_sample_top1_follows_step_and_trains() -> None:
    router = Router(4, 3, "sample_top1", top_k=1).double()
    router.set_step(5000)
    assert router.step.dtype == torch.int64 and int(router.step) == 5000
    router.to(torch.bfloat16)  # a dtype cast must not touch the step counter
    assert int(router.step) == 5000
    router.double().train()
    x = torch.randn(16, 4, dtype=torch.float64)
    router(x).weights_TK.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- the router module


def test_router_computes_in_fp32_for_bf16_models_even_under_autocast() -> None:
    router = Router(8, 4, "topk_softmax", top_k=2).to(torch.bfloat16)
    x = torch.randn(5, 8).to(torch.bfloat16)
    expected = x.float() @ router.weight.float().T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x)
    assert routing.logits_TE.dtype == torch.float32 and routing.weights_TK.dtype == torch.float32
    assert torch.equal(routing.logits_TE, expected)
    assert router(x.double()).logits_TE.dtype == torch.float64


# ---------------------------------------------------------------- properties

logits_strategy = st.builds(
    lambda T, E, seed, scale: (
        torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    ),
    T=st.integers(1, 24),
    E=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.0, 0.01, 1.0, 10.0]),
)


@settings(max_examples=60, deadline=None)
@given(
    logits=logits_strategy, k_fraction=st.floats(0.0, 1.0), kind=st.sampled_from(["ts", "soft", "st_renorm"])
)
def test_normalised_routings_sum_to_one_with_unique_experts(logits, k_fraction, kind) -> None:
    T, E = logits.shape
    k = 1 + int(k_fraction * (E - 1))
    routing = {
        "ts": lambda: topk_softmax(logits, k),
        "soft": lambda: soft(logits),
        "st_renorm": lambda: softmax_topk(logits, k, renormalize=True),
    }[kind]()
    torch.testing.assert_close(
        routing.weights_TK.sum(-1), torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert (routing.weights_TK >= 0).all()
    for row in routing.indices_TK.tolist():
        assert len(set(row)) == len(row) and all(0 <= e < E for e in row)


@settings(max_examples=40, deadline=None)
@given(logits=logits_strategy, k_fraction=st.floats(0.0, 1.0))
def test_topk_routings_choose_the_largest_logits(logits, k_fraction) -> None:
    E = logits.shape[1]
    k = 1 + int(k_fraction * (E - 1))
    for routing in (topk_softmax(logits, k), softmax_topk(logits, k)):
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, routing.indices_TK, True)
        smallest_chosen = logits.masked_fill(~chosen, math.inf).amin(-1)
        largest_left = logits.masked_fill(chosen, -math.inf).amax(-1)
        assert (smallest_chosen >= largest_left).all()


@settings(max_examples=60, deadline=None)
@given(
    logits=logits_strategy, k_fraction=st.floats(0.0, 1.0), factor=st.sampled_from([0.1, 0.5, 1.0, 1.25, 2.0])
)
def test_capacity_is_never_exceeded_and_keeps_the_most_probable(logits, k_fraction, factor) -> None:
    T, E = logits.shape
    k = 1 + int(k_fraction * (E - 1))
    routing = softmax_topk(logits, k)
    capacity = expert_capacity(T, k, factor, E)
    assert capacity == math.ceil(T * k * factor / E)
    keep = capacity_keep_mask(routing.probs_TE, routing.indices_TK, capacity)
    prob = routing.probs_TE.gather(1, routing.indices_TK)
    for expert in range(E):
        mine = routing.indices_TK == expert
        kept, dropped = mine & keep, mine & ~keep
        assert int(kept.sum()) == min(int(mine.sum()), capacity)
        if dropped.any():
            assert prob[dropped].max() <= prob[kept].min()
