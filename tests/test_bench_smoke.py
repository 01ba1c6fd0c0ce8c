"""The GPU benchmarks' CPU smoke runs (perf.md: on CPU, benchmarks only run as smoke tests).

Each script in bench/ builds, checks against its fp32 reference and times every implementation
on tiny shapes with `--cpu-smoke`, then prints its tables last. The scripts are loaded from their
files and their `main` called in this process (no second interpreter start-up), with the same
argument parsing as the command line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from benchlib import load_script  # noqa: E402

EXPECTED_ROWS = {
    "moe_layer": [
        "dense_ref",
        "hf eager",
        "hf grouped_mm",
        "ours eager",
        "ours grouped",
        "ours grouped skew",
    ],
    "attention_experts": [
        "dense",
        "moa expert-KV eager",
        "moa expert-KV wide",
        "moa shared-KV eager",
        "moa shared-KV wide",
    ],
}


@pytest.mark.parametrize("script", sorted(EXPECTED_ROWS))
def test_cpu_smoke_checks_times_and_prints_a_table(
    script: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    results = tmp_path / f"{script}.json"
    assert load_script(script).main(["--cpu-smoke", "--json", str(results)]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()

    # The output ends with a markdown table: a header, a rule, then one row per implementation.
    assert lines[-1].startswith("| ") and lines[-1].endswith(" |"), lines[-1]
    start = len(lines) - 1
    while lines[start - 1].startswith("|"):
        start -= 1
    header, rule, *rows = lines[start:]
    assert "TFLOP/s" in header and set(rule) <= set("|-")
    assert len({row.count("|") for row in [header, *rows]}) == 1
    for name in EXPECTED_ROWS[script]:
        matching = [row for row in rows if f"| {name} |" in row]
        assert matching, f"no row for {name}"
        assert all(row.rstrip(" |").endswith("ok") for row in matching), matching
        assert all("n/a |" not in row.split("|")[3] for row in matching)  # a time was measured

    payload = json.loads(results.read_text())
    assert {row["ok"] for row in payload["rows"]} == {True}


def test_profile_smoke_breaks_each_case_into_kernel_classes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    results = tmp_path / "profile.json"
    assert load_script("gpu_profile").main(["--cpu-smoke", "--json", str(results)]) == 0
    out = capsys.readouterr().out
    payload = json.loads(results.read_text())
    assert [p["case"].split()[0] for p in payload] == ["moe", "dense", "attention", "step"]
    for profile in payload:
        assert profile["kernel_ms_per_step"] > 0 and profile["top"]
        assert sum(profile["by_class"].values()) == pytest.approx(profile["kernel_ms_per_step"])
        assert f"## {profile['case']}" in out
        # the host table (cProfile): the step's own Python functions, ranked by self time
        assert profile["host_wall_ms_per_step"] > 0 and len(profile["host_top"]) == 25
        selfs = [row["self_ms"] for row in profile["host_top"]]
        assert selfs == sorted(selfs, reverse=True) and all(row["calls"] > 0 for row in profile["host_top"])
        assert sum(selfs) <= profile["host_wall_ms_per_step"] * 1.05  # self times are disjoint
    assert out.count("Host under cProfile:") == 4


def test_profile_classifies_inductor_glue_apart_from_gemms() -> None:
    classify = load_script("gpu_profile").classify
    assert classify("triton_poi_fused__grouped_mm_mul_silu_split_transpose_18") == "Triton (fused)"
    assert (
        classify(
            "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13GemmUniversalINS5_1GroupProblemShape"
        )
        == "grouped GEMM"
    )
    assert classify("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "GEMM"
    assert classify("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16") == "attention"
    assert classify("void at::native::vectorized_gather_kernel<16, long>") == "index / scatter / sort / scan"


def test_grouped_gemm_smoke_times_the_six_gemms(tmp_path: Path) -> None:
    results = tmp_path / "gemm.json"
    assert load_script("grouped_gemm").main(["--cpu-smoke", "--json", str(results)]) == 0
    rows = json.loads(results.read_text())
    assert [row["gemm"] for row in rows] == [
        "fwd gate_up", "fwd down", "dgrad down", "dgrad gate_up", "wgrad down", "wgrad gate_up",
    ]  # fmt: skip
    assert all(row["dense_tflops"] > 0 and row["grouped_tflops"] > 0 for row in rows)


def test_best_tiles_takes_the_best_spec_measured_on_every_row(tmp_path: Path) -> None:
    def row(shape: str, gemm: str, tiles: str, speedup: float) -> dict:
        return dict(
            shape=shape, gemm=gemm, tiles=tiles, baseline_tflops=100.0, gathered_tflops=100.0 * speedup
        )

    rows = [
        row("S2", "fwd", "a", 1.10), row("S2", "wgrad", "a", 0.95),  # geometric mean 1.022
        row("S2", "fwd", "b", 1.00), row("S2", "wgrad", "b", 1.00),  # 1.0
        row("S2", "fwd", "c", 2.00),  # fastest row, but it failed on wgrad: cannot win
        row("S1", "fwd", "b", 1.50), row("S1", "wgrad", "b", 1.50),  # b wins once S1 counts
    ]  # fmt: skip
    best = load_script("best_tiles")
    spec, speedup = best.best_spec(rows, {"S2"})
    assert spec == "a" and speedup == pytest.approx((1.10 * 0.95) ** 0.5)
    assert best.best_spec(rows)[0] == "b"  # a and c lack the S1 rows
    assert best.best_spec(rows, {"S3"}) is None
    path = tmp_path / "gather.json"
    path.write_text(json.dumps(rows))
    assert best.main([str(path), "--shapes", "S2"]) == 0
    assert best.main([str(tmp_path / "missing.json")]) == 1


def gathered_gemm_tiles() -> tuple:
    from upcycle.kernels import gather_gemm

    return gather_gemm.MM_TILES, gather_gemm.WGRAD_TILES, gather_gemm.NUM_WARPS, gather_gemm.NUM_STAGES


@pytest.mark.parametrize("spec", ["128,128,64,8", "128,100,64,8,3", "128,128,64,6,3", "128,128,8,4,3", "x"])
def test_gathered_gemm_tiles_refuse_a_bad_spec(spec: str) -> None:
    from upcycle.kernels import gather_gemm

    before = gathered_gemm_tiles()
    with pytest.raises(ValueError, match="tiles"):
        gather_gemm.set_tiles(spec)
    assert gathered_gemm_tiles() == before
    with pytest.raises(SystemExit) as exit_:
        load_script("moe_layer").main(["--cpu-smoke", "--gather-tiles", spec])
    assert exit_.value.code == 2


def test_gathered_gemm_tiles_apply_to_both_kernels() -> None:
    from upcycle.kernels import gather_gemm

    before = gathered_gemm_tiles()
    try:
        gather_gemm.set_tiles("64,128,32,4,4")
        assert gathered_gemm_tiles() == ((64, 128, 32), (64, 128, 32), 4, 4)
    finally:
        gather_gemm.MM_TILES, gather_gemm.WGRAD_TILES, gather_gemm.NUM_WARPS, gather_gemm.NUM_STAGES = before


def test_profile_idle_gaps_go_to_the_launcher_of_the_kernel_after_the_gap() -> None:
    gpu_profile = load_script("gpu_profile")
    Span = gpu_profile.Span
    kernels = [  # µs; two profiled steps
        Span(0, 100, "forward > mm"),
        Span(50, 120, "forward > add"),  # overlaps: no gap
        Span(150, 200, "backward > mm"),  # 30 µs idle, waiting for the backward's launch
        Span(1200, 1300, "optimizer > adamw"),  # 1000 µs idle: a host stall
        Span(1300, 1400, "backward > mm"),  # back to back: no gap
        Span(1410, 1500, "backward > mm"),  # 10 µs
    ]
    idle_ms, by = gpu_profile.idle_gaps(list(reversed(kernels)), steps=2)
    assert idle_ms == pytest.approx((30 + 1000 + 10) / 1000 / 2)
    assert [(r["launched_by"], r["idle_ms"], r["gaps"]) for r in by] == [
        ("optimizer > adamw", pytest.approx(0.5), 0.5),
        ("backward > mm", pytest.approx(0.02), 1.0),
    ]
    assert gpu_profile.idle_gaps([], steps=1) == (0.0, [])


@pytest.mark.parametrize("has_linked_ids", [True, False])
def test_profile_labels_each_kernel_by_the_op_above_its_launch_call(has_linked_ids: bool) -> None:
    """torch's linking: a kernel shares CUPTI's correlation id (`id`) with the runtime call that
    launched it, and both carry the launching op's id as `linked_correlation_id`. Op ids and
    CUPTI ids are separate counters: host events whose ids merely equal a kernel's linked id
    (CUPTI's buffer requests, in run G) must not be taken for its launcher. torch 2.11's
    FunctionEvent has no `linked_correlation_id` (the GPU machine's profile crashed on it, run K):
    there the CUPTI id alone links."""
    from types import SimpleNamespace

    import torch

    gpu_profile = load_script("gpu_profile")
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, device, id_, start, end, parent=None, linked=0):
        e = SimpleNamespace(
            name=name, device_type=device, id=id_, time_range=SimpleNamespace(start=start, end=end),
            cpu_parent=parent, is_user_annotation=False,
        )  # fmt: skip
        if has_linked_ids:
            e.linked_correlation_id = linked
        return e

    step = event("ProfilerStep", cpu, 3, 0, 100)
    mm = event("aten::mm", cpu, 7, 0, 10, parent=step)
    add = event("aten::add", cpu, 8, 30, 40, parent=step)
    launch = event("cudaLaunchKernel", cpu, 41, 2, 4, parent=mm, linked=7)
    launch_add = event("cuLaunchKernelEx", cpu, 44, 31, 32, parent=add, linked=8)
    decoys = [
        event("Activity Buffer Request", cpu, 7, 0, 1),
        event("Activity Buffer Request", cpu, 8, 50, 51),
    ]
    sync = event("cudaStreamSynchronize", cpu, 43, 20, 25, parent=mm)
    kernels = [
        event("gemm", cuda, 41, 5, 9, linked=7),  # its launch call by CUPTI id
        event("add", cuda, 99, 33, 34, linked=8),  # no runtime event with its id: by the op's id
        event("copy", cuda, 2, 12, 13, linked=0),  # neither
    ]
    spans, syncs = gpu_profile.host_waits(
        [step, mm, add, launch, launch_add, *decoys, sync, *kernels], steps=1
    )
    by_linked_id = "aten::add" if has_linked_ids else "(unknown launcher)"
    assert [span.label for span in spans] == ["aten::mm", by_linked_id, "(unknown launcher)"]
    assert [row["call"] for row in syncs] == ["cudaStreamSynchronize in aten::mm"]


def test_host_lag_smoke_marks_every_block_both_ways() -> None:
    from upcycle.kernels import grouped_moe

    loop = grouped_moe.grouped_weight_grad
    rows = load_script("host_lag").main(["--tiny"])
    assert grouped_moe.grouped_weight_grad is loop, "the marks must not outlive the run"
    points = [row[0] for row in rows]
    assert points[:3] == ["step starts", "forward, block 0", "forward, block 1"]
    assert (
        points.index("backward, block 1") < points.index("backward, block 0") < points.index("gradient norm")
    )
    assert points[-1] == "optimizer step"
    assert "weight-gradient loop 1 starts" in points
    hosts = [row[1] for row in rows]
    assert hosts == sorted(hosts) and hosts[-1] > 0
