"""Conversion memory stays near the largest tensor, whatever the model size (design.md, "Layers").

A random 0.48B-parameter Llama (bench/make_checkpoints.py's `llama-0.5b`: 8 layers, D 2048,
F 5632, V 32000, bf16, 0.97 GB) is converted by `upcycle convert` in a subprocess, as a user
runs it. Its own peak RSS (`ru_maxrss`, taken by bench/convert.py's `run_measured` through a
small launcher: a direct child of pytest would report pytest's own peak, which Linux carries
into a child's high-water mark, and RUSAGE_CHILDREN is the maximum over every child) must stay
within

    2 × (largest output tensor) + 600 MB,

where 600 MB covers the interpreter, torch, pydantic and the meta-device model plan: the
`baseline` test measures that part alone (the same command on a tiny model) and must itself
stay under 600 MB. The outputs are 1.5-2.6 GB, so a conversion that held the model, or even a
few layers, would fail. A few output tensors are compared exactly with the source.

The btx case (two copies of one source: exact, since the mean of x and x is x) streams its
averages by row chunks; the engine releases the previous output tensor before building the
next, and the sources forget their recently read FFN matrices once a stacked tensor is built.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import upcycle

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from convert import run_measured
from make_checkpoints import PRESETS, write_checkpoint

pytestmark = pytest.mark.slow  # about 40 s on a 2-core machine: a 1 GB source, 4 GB written

SHAPE = PRESETS["llama-0.5b"]
BASELINE_BUDGET = 600 * 10**6
BF16 = 2
LAST = SHAPE.layers - 1


def run_convert(config: dict, work: Path, name: str) -> tuple[Path, int, float]:
    """`upcycle convert` in its own process; returns (output folder, its peak RSS in bytes, wall s)."""
    config_path = work / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = work / name
    usage = run_measured([sys.executable, "-m", "upcycle", "convert", str(config_path), str(out), "--quiet"])
    return out, usage["peak_rss_bytes"], usage["wall_s"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("source") / "llama", SHAPE, seed=7)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> int:
    """Peak RSS of the same command on a tiny model: imports and planning, no real tensors."""
    work = tmp_path_factory.mktemp("baseline")
    tiny = write_checkpoint(work / "tiny", PRESETS["tiny"], seed=1)
    _, peak, _ = run_convert({"recipe": "sparse", "sources": [str(tiny)], "num_experts": 4}, work, "out")
    return peak


def test_baseline_fits_its_budget(baseline):
    assert baseline <= BASELINE_BUDGET, f"upcycle convert costs {baseline / 1e6:.0f} MB before any tensor"


def read(folder: Path, name: str) -> torch.Tensor:
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        with safe_open(file, "pt") as handle:
            if name in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
                return handle.get_tensor(name)
    raise KeyError(name)


def check_experts_copy_the_source(out: Path, source: Path, experts: int) -> None:
    prefix = f"model.layers.{LAST}.mlp"
    gate_up = read(out, f"{prefix}.experts.gate_up_proj")
    down = read(out, f"{prefix}.experts.down_proj")
    dense_gate_up = torch.cat(
        [read(source, f"{prefix}.gate_proj.weight"), read(source, f"{prefix}.up_proj.weight")]
    )
    dense_down = read(source, f"{prefix}.down_proj.weight")
    assert gate_up.shape == (experts, *dense_gate_up.shape) and down.shape == (experts, *dense_down.shape)
    for expert in range(experts):
        assert torch.equal(gate_up[expert], dense_gate_up), expert
        assert torch.equal(down[expert], dense_down), expert
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        f"model.layers.{LAST}.self_attn.o_proj.weight",
    ):
        assert torch.equal(read(out, name), read(source, name)), name
    router = read(out, f"{prefix}.gate.weight")
    assert router.shape == (experts, SHAPE.hidden) and torch.isfinite(router.float()).all()
    assert upcycle.load_config(out).moe.num_experts == experts


CASES = {
    "sparse-4": ({"recipe": "sparse", "num_experts": 4}, 1, 4),
    "btx-2-copies": ({"recipe": "btx"}, 2, 2),
}


def largest_output_bytes(experts: int) -> int:
    """The stacked gate/up [E, 2F, D] or the embedding/head [V, D], whichever is larger."""
    shapes = [
        (experts, 2 * SHAPE.ffn, SHAPE.hidden),
        (experts, SHAPE.hidden, SHAPE.ffn),
        (SHAPE.vocab, SHAPE.hidden),
    ]
    return max(math.prod(shape) for shape in shapes) * BF16


@pytest.mark.parametrize(
    "case",
    [
        "sparse-4",
        "btx-2-copies",
    ],
)
def test_peak_memory_is_near_the_largest_tensor(case, source, baseline, tmp_path):
    recipe, copies, experts = CASES[case]
    largest = largest_output_bytes(experts)
    out, peak, wall = run_convert({**recipe, "sources": [str(source)] * copies}, tmp_path, "out")
    check_experts_copy_the_source(out, source, experts)
    bound = 2 * largest + BASELINE_BUDGET
    print(
        f"{case}: peak RSS {peak / 1e6:.0f} MB (baseline {baseline / 1e6:.0f} MB), bound {bound / 1e6:.0f} MB, "
        f"largest tensor {largest / 1e6:.0f} MB, wall {wall:.1f} s"
    )
    assert peak <= bound, (
        f"{case}: peak RSS {peak / 1e6:.0f} MB over the bound {bound / 1e6:.0f} MB "
        f"(2 × largest tensor {largest / 1e6:.0f} MB + 600 MB; baseline {baseline / 1e6:.0f} MB)"
    )
