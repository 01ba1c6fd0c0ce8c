"""BAM's attention experts against one dense attention block: bf16 forward + backward, one GPU.

perf.md's attention case: B2 S4096, D 4096, 32 query / 8 KV heads of width 128, causal, E = 4
soft-routed attention experts, forward + backward including the projections and RoPE.

Rows:
- `dense`: `upcycle.model.attention.Attention` (q/k/v/o projections, RoPE, one SDPA call).
- `moa expert-KV eager` / `wide`: `upcycle.model.moa.MixtureOfAttention`, every expert with its
  own K/V, as a loop of E attentions (`eager`, the reference) or one attention of E·H query
  heads (`wide`, `upcycle.kernels.wide_attention`).
- `moa shared-KV eager` / `wide`: one K/V projection for all experts; `wide` is then GQA with
  E·H query heads over Hk KV heads.
- `... cudnn` (GPU only): the same call inside `sdpa_kernel([CUDNN_ATTENTION])`, which perf.md
  names as what others use on Hopper; upcycle's `attend` does not request it. A backend that
  refuses the call is reported as such.

FLOPs (perf.md "Counting FLOPs"): per token 6 · parameters + 12 · heads · Dh · S, no causal
halving; a MoA layer has E·H heads and counts all E experts' projections plus its router, with
the shared K/V once. TFLOP/s of every row use its own count; the target compares TFLOP/s (wide,
both variants, ≥ 0.95 × the dense block).

Correctness first, on fresh random inputs at a smaller size (B1 S2048: the fp32 reference runs
SDPA's math kernel, whose S×S scores grow quadratically): output, input gradient and query
projection gradient against an fp32 copy of the same module run eagerly (the loop of experts
for MoA), ‖a − ref‖ / ‖ref‖ ≤ 1e-2 and no NaN. Timing: warm-up, median of ≥ 15 steps with CUDA
events, peak memory per row.

Usage:
    python bench/attention_experts.py [--steps 20] [--warmup 3] [--no-cudnn] [--json PATH]
    python bench/attention_experts.py --cpu-smoke     # tiny shapes on the CPU, for tests
Prints the tables last. Exits 1 if any correctness check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchlib import environment, fmt, ratio, relative_error, synchronize, time_calls  # noqa: E402

from upcycle.model.attention import Attention  # noqa: E402
from upcycle.model.config import ModelConfig  # noqa: E402
from upcycle.model.moa import MixtureOfAttention  # noqa: E402
from upcycle.model.rope import rope_cos_sin  # noqa: E402

TOLERANCE = 1e-2
GIB = 2**30
TARGET_WIDE = 0.95
# perf.md anchors, TFLOP/s on one H100 (2026-11-24).
ANCHORS = {
    "dense": 567,
    "moa expert-KV eager": 462,
    "moa expert-KV wide": 530,
    "moa shared-KV wide": 507,
}


@dataclass(frozen=True)
class Case:
    B: int
    S: int
    D: int
    H: int
    Hk: int
    Dh: int
    E: int
    check_B: int
    check_S: int

    def config(self, share_kv: bool | None) -> ModelConfig:
        moa = None if share_kv is None else {"num_experts": self.E, "share_kv": share_kv}
        return ModelConfig(
            vocab_size=8,
            hidden_size=self.D,
            intermediate_size=4 * self.D,
            num_hidden_layers=1,
            num_attention_heads=self.H,
            num_key_value_heads=self.Hk,
            head_dim=self.Dh,
            moa=moa,
        )

    def flops(self, experts: int, share_kv: bool) -> int:
        """Training FLOPs of one step over B·S tokens (perf.md counting; experts=0: dense)."""
        D, H, Hk, Dh, S = self.D, self.H, self.Hk, self.Dh, self.S
        query_output, key_value = 2 * D * H * Dh, 2 * D * Hk * Dh
        if experts == 0:
            params, heads = query_output + key_value, H
        else:
            kv_copies = 1 if share_kv else experts
            params, heads = experts * query_output + kv_copies * key_value + experts * D, experts * H
        return self.B * S * (6 * params + 12 * heads * Dh * S)


GPU_CASE = Case(B=2, S=4096, D=4096, H=32, Hk=8, Dh=128, E=4, check_B=1, check_S=2048)
SMOKE_CASE = Case(B=1, S=64, D=64, H=4, Hk=2, Dh=16, E=4, check_B=1, check_S=32)


@dataclass
class Row:
    name: str
    flops: int
    ms: float | None = None
    ms_spread: tuple[float, float] | None = None
    tflops: float | None = None
    peak_gib: float | None = None
    errors: dict[str, float] = field(default_factory=dict)
    ok: bool | None = None
    note: str = ""
    round_ms: list[float] = field(default_factory=list)  # the median of each round's steps


# ----------------------------------------------------------------------------- environment


def cudnn_only() -> contextlib.AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


# ----------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    module: nn.Module
    implementation: str | None  # MoA implementation, None for the dense block
    cudnn: bool
    flops: int
    query_weight: Callable[[nn.Module], torch.Tensor]
    compiled: bool = False

    def forward(
        self, module: nn.Module, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        if self.implementation is not None:
            module.implementation = self.implementation
        call = _compiled(module) if self.compiled else module
        with cudnn_only() if self.cudnn else contextlib.nullcontext():
            out = call(u, cos, sin, None)
        return out[0] if isinstance(out, tuple) else out


_COMPILED: dict[int, nn.Module] = {}


def _compiled(module: nn.Module) -> nn.Module:
    """One `torch.compile` wrapper per module (same parameters), made on first use."""
    if id(module) not in _COMPILED:
        _COMPILED[id(module)] = torch.compile(module, dynamic=False)
    return _COMPILED[id(module)]


def build_modules(case: Case, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The dense block and the two MoA layers, built on the device with their own initialisation."""
    modules: dict[str, nn.Module] = {}
    with torch.device(device):
        modules["dense"] = Attention(case.config(None))
        modules["expert-KV"] = MixtureOfAttention(case.config(False), 0)
        modules["shared-KV"] = MixtureOfAttention(case.config(True), 0)
    return {name: module.to(dtype).train() for name, module in modules.items()}


def variants(
    case: Case, modules: dict[str, nn.Module], with_cudnn: bool, with_compile: bool = False
) -> list[Variant]:
    dense_q = lambda m: m.q_proj.weight  # noqa: E731
    moa_q = lambda m: m.experts.q_proj  # noqa: E731
    out = [Variant("dense", modules["dense"], None, False, case.flops(0, False), dense_q)]
    for kv in ("expert-KV", "shared-KV"):
        flops = case.flops(case.E, kv == "shared-KV")
        for implementation in ("eager", "wide"):
            out.append(
                Variant(f"moa {kv} {implementation}", modules[kv], implementation, False, flops, moa_q)
            )
    if with_cudnn:
        out.append(Variant("dense cudnn", modules["dense"], None, True, case.flops(0, False), dense_q))
        for kv in ("expert-KV", "shared-KV"):
            flops = case.flops(case.E, kv == "shared-KV")
            out.append(Variant(f"moa {kv} wide cudnn", modules[kv], "wide", True, flops, moa_q))
    if with_compile:
        # Both sides compiled: the target compares MoA with a dense block built the same way.
        out.append(
            Variant("dense compiled", modules["dense"], None, False, case.flops(0, False), dense_q, True)
        )
        for kv in ("expert-KV", "shared-KV"):
            flops = case.flops(case.E, kv == "shared-KV")
            out.append(Variant(f"moa {kv} wide compiled", modules[kv], "wide", False, flops, moa_q, True))
    return out


def rope_tables(case: Case, batch: int, seq: int, device: torch.device, dtype: torch.dtype):
    positions = torch.arange(seq, device=device)[None].expand(batch, seq)
    return rope_cos_sin(case.config(None).rope, case.Dh, positions, dtype)


def check(
    variant: Variant,
    reference_module: nn.Module,
    u: torch.Tensor,
    g: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> dict[str, float]:
    """Output, dL/du and dL/dW_q of the bf16 variant against the fp32 eager reference module."""
    ref_variant = copy.copy(variant)
    ref_variant.cudnn = False
    ref_variant.compiled = False
    ref_variant.implementation = None if variant.implementation is None else "eager"
    u32 = u.detach().float().requires_grad_()
    reference_module.zero_grad(set_to_none=True)
    out32 = ref_variant.forward(reference_module, u32, cos.float(), sin.float())
    out32.backward(g.float())
    module = variant.module
    module.zero_grad(set_to_none=True)
    u16 = u.detach().requires_grad_()
    out = variant.forward(module, u16, cos, sin)
    out.backward(g)
    errors = {
        "out": relative_error(out.detach(), out32.detach()),
        "du": relative_error(u16.grad, u32.grad),
        "dW_q": relative_error(
            variant.query_weight(module).grad, variant.query_weight(reference_module).grad
        ),
    }
    module.zero_grad(set_to_none=True)
    reference_module.zero_grad(set_to_none=True)
    return errors


def measure(
    variant: Variant,
    u: torch.Tensor,
    g: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    device: torch.device,
    warmup: int,
    steps: int,
    peak: bool = True,
) -> dict[str, object]:
    module = variant.module
    u = u.detach().requires_grad_()

    def step() -> None:
        module.zero_grad(set_to_none=True)
        u.grad = None
        variant.forward(module, u, cos, sin).backward(g)

    result: dict[str, object] = {"ms_all": time_calls(step, device, warmup, steps)}
    if peak and device.type == "cuda":
        module.zero_grad(set_to_none=True)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    module.zero_grad(set_to_none=True)
    return result


# ----------------------------------------------------------------------------- report


def results_table(rows: list[Row]) -> list[str]:
    dense = next((row for row in rows if row.name == "dense"), None)
    lines = [
        "| variant | GFLOP/step | ms | TFLOP/s | TFLOP/s ÷ dense | vs perf.md anchor | peak GiB "
        "| rel err out / du / dW_q | check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        anchor = ANCHORS.get(row.name)
        errs = " / ".join(f"{v:.1e}" for v in row.errors.values()) or "n/a"
        verdict = ("ok" if row.ok else "FAIL") + (f" [{row.note[:70]}]" if row.note else "")
        lines.append(
            f"| {row.name} | {row.flops / 1e9:.0f} | {fmt(row.ms, '.2f')} | {fmt(row.tflops, '.0f')} "
            f"| {fmt(ratio(row.tflops, dense.tflops if dense else None), '.2f')} "
            f"| {fmt(ratio(row.tflops, anchor), '.2f') + (f' of {anchor}' if anchor else '')} "
            f"| {fmt(row.peak_gib, '.2f')} | {errs} | {verdict} |"
        )
    return lines


def targets_table(rows: list[Row]) -> list[str]:
    named = {row.name: row for row in rows}
    dense = named.get("dense")
    lines = [
        "| what | TFLOP/s ÷ dense block | each round | target | verdict |",
        "|---|---|---|---|---|",
    ]
    for name in (
        "moa expert-KV wide",
        "moa shared-KV wide",
        "moa expert-KV wide cudnn",
        "moa shared-KV wide cudnn",
        "moa expert-KV wide compiled",
        "moa shared-KV wide compiled",
    ):
        row = named.get(name)
        if row is None:
            continue
        base = named.get("dense compiled") if name.endswith("compiled") else dense
        value = ratio(row.tflops, base.tflops if base else None)
        verdict = "n/a" if value is None else ("MET" if value >= TARGET_WIDE else "MISSED")
        against = " (÷ dense compiled)" if name.endswith("compiled") else ""
        per_round = " ".join(
            f"{(row.flops / mine) / (base.flops / theirs):.3f}"
            for mine, theirs in zip(row.round_ms, base.round_ms if base else [], strict=False)
        )
        lines.append(
            f"| {name}{against} | {fmt(value, '.2f')} | {per_round or 'n/a'} | ≥ {TARGET_WIDE} | {verdict} |"
        )
    cudnn_dense = named.get("dense cudnn")
    if cudnn_dense is not None and dense is not None:
        lines.append(
            f"| dense cudnn ÷ dense (default SDPA) | {fmt(ratio(cudnn_dense.tflops, dense.tflops), '.2f')} | | | |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    threads = torch.get_num_threads()
    try:
        return run(argv)
    finally:
        torch.set_num_threads(threads)


def run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median taken); ≥ 15")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="time every variant once per round, interleaved, and take each row's median over all rounds",
    )
    parser.add_argument("--no-cudnn", action="store_true", help="skip the rows that request cuDNN attention")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (a test)")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    if args.cpu_smoke:
        # Tiny ops: one thread avoids OpenMP spinning on a shared 2-core CI machine.
        torch.set_num_threads(1)
        device, case, steps, warmup, with_cudnn = torch.device("cpu"), SMOKE_CASE, 2, 1, False
        with_compile, rounds = False, 2
    else:
        if not torch.cuda.is_available():
            print("attention_experts: no CUDA GPU; use --cpu-smoke for the CPU smoke run", file=sys.stderr)
            return 2
        if args.steps < 15:
            parser.error("perf.md asks for the median of at least 15 timed steps")
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        device, case, steps, warmup = torch.device("cuda"), GPU_CASE, args.steps, args.warmup
        rounds = args.rounds
        with_cudnn = not args.no_cudnn
        with_compile = not args.no_compile
    assert not torch.backends.cuda.matmul.allow_tf32, "the fp32 reference must not run in tf32"
    env = environment(device)
    log("attention_experts: " + " ".join(f"{k}={v}" for k, v in env.items()))
    log(f"case: {asdict(case)}")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    generator = torch.Generator(device=device).manual_seed(0)
    modules = build_modules(case, device, dtype)
    references = {name: copy.deepcopy(module).float() for name, module in modules.items()}
    reference_of = {id(module): references[name] for name, module in modules.items()}
    rows: list[Row] = []
    all_variants = variants(case, modules, with_cudnn, with_compile)

    # ---- correctness first, at the check size, on fresh inputs
    cos_c, sin_c = rope_tables(case, case.check_B, case.check_S, device, dtype)
    u_check = torch.randn(case.check_B, case.check_S, case.D, generator=generator, device=device).to(dtype)
    g_check = torch.randn(case.check_B, case.check_S, case.D, generator=generator, device=device).to(dtype)
    for variant in all_variants:
        row = Row(variant.name, variant.flops)
        rows.append(row)
        try:
            row.errors = check(variant, reference_of[id(variant.module)], u_check, g_check, cos_c, sin_c)
            row.ok = all(v == v and v <= TOLERANCE for v in row.errors.values())
        except Exception as error:  # a refused backend or a broken variant: record, go on
            row.ok, row.note = False, f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
        errs = " ".join(f"{k}={v:.2e}" for k, v in row.errors.items())
        log(f"check {variant.name:<26} {errs} {'ok' if row.ok else 'FAIL'} {row.note}")
    del references, reference_of, u_check, g_check
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- timing at the full size
    cos, sin = rope_tables(case, case.B, case.S, device, dtype)
    u = torch.randn(case.B, case.S, case.D, generator=generator, device=device).to(dtype)
    g = torch.randn(case.B, case.S, case.D, generator=generator, device=device).to(dtype)
    # Rounds: every variant timed once per round, in the same order, and each row's median taken
    # over all its rounds' steps. A card's clocks drift as it heats (a dense block timed first on a
    # cool card and the wide ones a minute later would carry that drift into the ratio); rounds
    # spread every row over the whole run. Per-round ratios to the dense block are logged.
    times_of: dict[str, list[float]] = {row.name: [] for row in rows}
    for round_index in range(rounds):
        for variant, row in zip(all_variants, rows, strict=True):
            if row.note:  # a failed check, or a timing that raised in an earlier round
                if round_index == 0:
                    log(f"time  {variant.name:<26} skipped: {row.note[:120]}")
                continue
            try:
                result = measure(
                    variant,
                    u,
                    g,
                    cos,
                    sin,
                    device,
                    warmup if round_index == 0 else 1,
                    steps,
                    peak=round_index == 0,
                )
            except Exception as error:
                row.note = f"timing raised {type(error).__name__}: {error}".replace("\n", " ")[:300]
                log(f"time  {variant.name:<26} FAILED: {row.note}")
                continue
            times = result["ms_all"]
            times_of[row.name].extend(times)
            if "peak_bytes" in result:
                row.peak_gib = result["peak_bytes"] / GIB
            log(f"time  {variant.name:<26} round {round_index + 1}: {statistics.median(times):8.3f} ms")
    for row in rows:
        times = times_of[row.name]
        if not times:
            continue
        row.ms = statistics.median(times)
        row.ms_spread = (min(times), max(times))
        row.tflops = row.flops / row.ms / 1e9
        rounds_ms = [
            statistics.median(times[i * steps : (i + 1) * steps]) for i in range(len(times) // steps)
        ]
        row.round_ms = rounds_ms
        log(
            f"time  {row.name:<26} {row.ms:8.3f} ms (min {row.ms_spread[0]:.3f} max "
            f"{row.ms_spread[1]:.3f}; rounds {' '.join(f'{m:.3f}' for m in rounds_ms)}) {row.tflops:7.1f} TFLOP/s"
        )

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": env,
            "case": asdict(case),
            "steps": steps,
            "warmup": warmup,
            "rounds": rounds,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2))
        log(f"wrote {args.json}")

    # A refused cuDNN backend is reported, not a correctness failure of upcycle's code.
    failed = [r for r in rows if not r.ok and not (r.name.endswith("cudnn") and not r.errors)]
    print()
    print(
        f"Attention experts, B{case.B} S{case.S} D{case.D} {case.H}/{case.Hk} heads Dh{case.Dh} E{case.E}, "
        f"bf16 fwd+bwd, {env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}"
    )
    print("\n".join(targets_table(rows)))
    print()
    print("\n".join(results_table(rows)))
    if failed:
        print(f"\nFAILED correctness: {', '.join(r.name for r in failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
