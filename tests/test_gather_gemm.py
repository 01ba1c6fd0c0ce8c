"""The gathered grouped GEMMs of `upcycle.kernels.gather_gemm` (opt-in `grouped_moe.GATHER_GEMM`):
both kernels against torch products in Triton's CPU interpreter (fp32, IEEE products): empty
experts, no rows at all, expert counts that are not multiples of the row tile, widths that are
not multiples of the column tiles, both weight layouts, either operand of the weight gradient
gathered; and the whole expert path with the flag on against the eager loop, forward and every
gradient. On the GPU machine: bf16 against the fp32 eager loop.
"""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch
from test_swiglu import assert_bf16_on_gpu_matches_the_fp32_loop
from triton_helpers import run_interpreted

from upcycle.kernels import grouped_moe as grouped

INTERPRETED = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F

    from upcycle.kernels import gather_gemm, grouped_moe
    from upcycle.model.moe import eager_experts

    gather_gemm.MM_TILES = gather_gemm.WGRAD_TILES = (16, 16, 16)  # several tiles per expert
    generator = torch.Generator().manual_seed(0)

    def segments(offsets):
        ends = offsets.tolist()
        return list(zip([0] + ends[:-1], ends))

    def relative(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    # (tokens, k, experts, reduced width, output width); the last expert never gets a row
    for T, K, E, R, N in ((10, 2, 5, 20, 24), (23, 3, 4, 33, 17), (0, 2, 3, 16, 16), (1, 1, 6, 16, 40)):
        indices = torch.randint(0, E - 1, (T, K), generator=generator).reshape(-1)
        order = torch.argsort(indices, stable=True)
        token = torch.div(order, K, rounding_mode="floor")
        offsets = torch.bincount(indices, minlength=E).cumsum(0).to(torch.int32)
        x = torch.randn(T, R, generator=generator)
        w_nk, w_kn = torch.randn(E, N, R, generator=generator), torch.randn(E, R, N, generator=generator)
        for layout, w, per_expert in (("nk", w_nk, lambda e: w_nk[e].T), ("kn", w_kn, lambda e: w_kn[e])):
            got = gather_gemm.gather_grouped_mm(x, token, w, offsets, layout)
            assert got.shape == (T * K, N)
            if T:
                want = torch.cat([x[token[s:e]] @ per_expert(i) for i, (s, e) in enumerate(segments(offsets))])
                assert relative(got, want) < 1e-6, (layout, relative(got, want))
        g_sorted, g_tokens = torch.randn(T * K, N, generator=generator), torch.randn(T, N, generator=generator)
        s_sorted = torch.randn(T * K, R, generator=generator)
        for g, g_rows, s, s_rows in ((g_sorted, None, x, token), (g_tokens, token, s_sorted, None)):
            got = gather_gemm.gather_grouped_wgrad(g, g_rows, s, s_rows, offsets)
            assert got.shape == (E, N, R) and torch.count_nonzero(got[E - 1]) == 0
            take = lambda t, rows, a, b: t[rows[a:b]] if rows is not None else t[a:b]
            want = torch.stack([take(g, g_rows, a, b).T @ take(s, s_rows, a, b) for a, b in segments(offsets)])
            if T:
                assert relative(got, want) < 1e-6, relative(got, want)

    # strided operands: source rows and gradients as column slices of wider tensors, the weights
    # as transposed views, the sorted operand of the weight gradient sliced too
    T, K, E, R, N = 9, 2, 3, 16, 20
    indices = torch.randint(0, E, (T, K), generator=generator).reshape(-1)
    order = torch.argsort(indices, stable=True)
    token = torch.div(order, K, rounding_mode="floor")
    offsets = torch.bincount(indices, minlength=E).cumsum(0).to(torch.int32)
    x = torch.randn(T, R + 5, generator=generator)[:, 2 : 2 + R]
    w_nk = torch.randn(E, R, N, generator=generator).transpose(1, 2)  # [E, N, R], not contiguous
    w_kn = torch.randn(E, N, R, generator=generator).transpose(1, 2)  # [E, R, N], not contiguous
    for layout, w, per_expert in (("nk", w_nk, lambda e: w_nk[e].T), ("kn", w_kn, lambda e: w_kn[e])):
        got = gather_gemm.gather_grouped_mm(x, token, w, offsets, layout)
        want = torch.cat([x[token[s:e]] @ per_expert(i) for i, (s, e) in enumerate(segments(offsets))])
        assert relative(got, want) < 1e-6, ("strided", layout, relative(got, want))
    g = torch.randn(T, N + 3, generator=generator)[:, 3:]
    s_sorted = torch.randn(T * K, R + 4, generator=generator)[:, :R]
    got = gather_gemm.gather_grouped_wgrad(g, token, s_sorted, None, offsets)
    want = torch.stack([g[token[a:b]].T @ s_sorted[a:b] for a, b in segments(offsets)])
    assert relative(got, want) < 1e-6, ("strided wgrad", relative(got, want))
    for bad in (offsets.long(), offsets[:-1]):  # refused, not read out of bounds
        try:
            gather_gemm.gather_grouped_mm(x, token, w_nk, bad, "nk")
        except ValueError as error:
            assert "offsets must be int32" in str(error)
        else:
            raise AssertionError("bad offsets were accepted")

    # the whole expert path with the flag on: forward and all four gradients against the eager loop
    grouped_moe.GATHER_GEMM = True
    calls = []
    for name in ("gather_grouped_mm", "gather_grouped_wgrad"):
        original = getattr(grouped_moe, name)
        setattr(grouped_moe, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    from test_swiglu import routed

    x, probs, indices, w_in, w_down = routed(40, 6, 2, 32, 24, torch.float32, seed=1)
    g = torch.randn(40, 32, generator=generator)
    results = []
    for run in (grouped_moe.grouped_moe, eager_experts):
        leaves = [t.clone().requires_grad_() for t in (x, probs, w_in, w_down)]
        out = run(leaves[0], leaves[1], indices, leaves[2], leaves[3], F.silu, True)
        out.backward(g)
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    assert sorted(calls) == ["gather_grouped_mm"] * 2 + ["gather_grouped_wgrad"] * 2, calls
    for name, got, want in zip(("out", "dx", "dweights", "dw_in", "dw_down"), *results):
        assert relative(got, want) < 1e-5, (name, relative(got, want))
    print("interpreted ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_gathered_grouped_gemms_in_the_interpreter_match_torch() -> None:
    assert "interpreted ok" in run_interpreted(INTERPRETED)


def test_the_flag_leaves_cpu_runs_without_the_interpreter_alone(monkeypatch) -> None:
    monkeypatch.setattr(grouped, "GATHER_GEMM", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(4, 16)
    assert not grouped.use_gather_gemm(x, torch.tensor([2, 4], dtype=torch.int32))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert (
        grouped.use_gather_gemm(x, torch.tensor([2, 4], dtype=torch.int32))
        == grouped.swiglu.triton_installed()
    )
    assert not grouped.use_gather_gemm(x, None)  # the segment loop (no device offsets) keeps its gathers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gathered_kernels_on_gpu_in_fp32_are_ieee_products() -> None:
    """fp32 operands multiply in IEEE fp32 (TF32 would be off by about 1e-3 here)."""
    from upcycle.kernels import gather_gemm

    generator = torch.Generator().manual_seed(31)
    T, K, E, R, N = 512, 2, 8, 256, 384
    indices = torch.randint(0, E, (T * K,), generator=generator)
    order = torch.argsort(indices, stable=True)
    token = torch.div(order, K, rounding_mode="floor").cuda()
    offsets = torch.bincount(indices, minlength=E).cumsum(0).to(torch.int32).cuda()
    x, w = torch.randn(T, R, generator=generator).cuda(), torch.randn(E, N, R, generator=generator).cuda()
    got = gather_gemm.gather_grouped_mm(x, token, w, offsets, "nk").double()
    ends = offsets.tolist()
    want = torch.cat(
        [
            x[token[a:b]].double() @ w[e].double().T
            for e, (a, b) in enumerate(zip([0, *ends[:-1]], ends, strict=True))
        ]
    )
    assert float((got - want).norm() / want.norm()) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("experts", [8, 64])
def test_gathered_path_on_gpu_matches_the_fp32_eager_loop(experts: int, monkeypatch) -> None:
    monkeypatch.setattr(grouped, "GATHER_GEMM", True)
    calls = []
    for name in ("gather_grouped_mm", "gather_grouped_wgrad"):
        original = getattr(grouped, name)
        monkeypatch.setattr(
            grouped, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    assert_bf16_on_gpu_matches_the_fp32_loop(grouped.grouped_moe, experts, seed=experts)
    assert sorted(calls) == ["gather_grouped_mm"] * 2 + ["gather_grouped_wgrad"] * 2, calls  # the kernels ran


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_gather_gemm_bench_runs_on_the_cpu_in_the_interpreter() -> None:
    """bench/gather_gemm.py --cpu-smoke: every GEMM row printed, each matching its baseline."""
    stdout = run_interpreted(
        "import runpy, sys\nsys.argv = ['bench/gather_gemm.py', '--cpu-smoke']\n"
        "runpy.run_path('bench/gather_gemm.py', run_name='__main__')\n",
        timeout=300,
    )
    rows = [line.split("|") for line in stdout.splitlines() if line.startswith("| tiny |")]
    assert [row[2].strip() for row in rows] == ["fwd gate_up", "dgrad down", "wgrad down", "wgrad gate_up"]
    assert all(float(row[10]) < 1e-5 for row in rows), stdout
