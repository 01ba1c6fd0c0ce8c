"""Tokens/s and MFU of one training step: a ~110M-parameter dense model and its 4-expert BTX MoE.

What is timed is the trainer's own step (`upcycle.train.TrainStep`): forward under bf16
autocast, loss = LM + aux, backward, gradient norm, clipping at 1.0, fused AdamW, one host
synchronisation. Batches are random token ids made on the GPU beforehand, so data reading is
not part of the figure (it is a memcpy of a few MB per step in training).

Cases (perf.md conventions; FLOPs from `upcycle.model.flops.training_flops_per_token`):
- `dense`: Llama layout, vocab 32000, D 768, 12 layers, 12 heads, F 2048, tied embeddings
  (≈110M parameters);
- `btx4`: the same with every FFN replaced by 4 experts of width 2048, top-2 (topk_softmax, as
  BTX), BTX load-balancing loss 0.01: what `upcycle convert` (recipe btx) makes from 4 branches
  of the dense model (weights are random here; speed does not depend on them, and a fresh
  router routes near-uniformly).
- `mixtral`: perf.md's Mixtral-shaped config (fp32 master weights under bf16 autocast);
  `mixtral-bf16w`: the same with `precision: bf16-weights` (bf16 weights and AdamW moments,
  fp32 routers), like for like with `hf-mixtral-bf16` (transformers' MixtralForCausalLM with
  bf16 weights, grouped_mm experts); `hf-mixtral`: transformers with fp32 weights.

Protocol: warm-up steps first (the first one, which includes compilation with --compile, is
timed and reported separately), then `--steps` steps back to back as a training loop runs them,
with a CUDA event recorded at every step boundary and the host synchronising only after the
last; the median of the per-step intervals is reported ("step ms"). Neither side reads a value
on the host that its loop would not: ours reads the step's loss and norm once per step (the
trainer logs them) as the trainer does, step s's after step s + 1 is launched (`TrainStep.launch`:
a graphed step is queued before the previous one is read), transformers' loss is read after
timing. "isolated ms" times some of the
same steps again, each from an idle GPU until all its work is done (the earlier protocol), so the
two can be compared. Peak memory from `torch.cuda.max_memory_allocated`. MFU against 790 TFLOP/s (measured
bf16 matmul ceiling of an H100, perf.md), against this card's own ceiling measured first in the same
process ("MFU (card)": the fastest bf16 n³ `torch.mm`, n = 4096, 8192, 16384; `--no-ceiling` skips
it) and against 989 (datasheet). The `moe path` column says which expert
implementation the MoE layers resolved to for the inputs they actually received.

Usage (GPU):  python bench/train_step.py [--compile] [--cuda-graph] [--keep-rows] [--batch 16] [--seq-len 2048]
                                         [--steps 15] [--json results.json]

`--cuda-graph` replays our whole step as one CUDA graph (`train.cuda_graph`,
`upcycle.train.cuda_graph`): of the three untimed warm-up steps the first two run eagerly and the
third is captured and replayed, so every timed step is a replay.
CPU smoke:    python bench/train_step.py --tiny     (a tiny config in fp32, seconds; figures
              from it mean nothing)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import matmul_ceiling, run_header

from upcycle.data import Batch
from upcycle.kernels.dtypes import autocast_dtype
from upcycle.model import ModelConfig, Transformer
from upcycle.model.flops import active_parameters, total_parameters, training_flops_per_token
from upcycle.model.init import init_weights
from upcycle.model.moe import MoE
from upcycle.train.build import cast_to_bf16_weights, compile_blocks
from upcycle.train.distributed import Distributed
from upcycle.train.metrics import H100_BF16_DATASHEET_FLOPS, H100_BF16_MEASURED_FLOPS
from upcycle.train.step import TrainStep, benchmark_step

DENSE_110M = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
# perf.md's whole-model anchor: transformers MixtralForCausalLM, vocab 32000, D1024, 8 layers,
# 16/4 heads, F2816, 8 experts top-2, batch 8 x 2048 (grouped_mm experts: 140k tokens/s).
MIXTRAL = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
MIXTRAL_MOE = dict(num_experts=8, top_k=2, routing="topk_softmax", aux_loss="switch", aux_loss_coef=0.01)
TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
BTX4 = dict(num_experts=4, top_k=2, routing="topk_softmax", aux_loss="btx", aux_loss_coef=0.01)


@dataclass
class Row:
    case: str
    parameters: int
    active: int
    tokens_per_step: int
    first_step_s: float
    step_ms: float
    tokens_per_s: float
    tflops: float
    mfu: float | None
    mfu_datasheet: float | None
    mfu_card: float | None  # against this card's matmul ceiling, measured in the same process
    peak_gb: float | None
    moe_path: str
    loss: float
    isolated_step_ms: float


def case_configs(tiny: bool) -> dict[str, ModelConfig]:
    dense = TINY if tiny else DENSE_110M
    mixtral = {**TINY, "num_key_value_heads": 2} if tiny else MIXTRAL
    return {
        "dense": ModelConfig(**dense),
        "btx4": ModelConfig(**dense, moe=BTX4),
        "mixtral": ModelConfig(**mixtral, moe=MIXTRAL_MOE),
        "mixtral-bf16w": ModelConfig(**mixtral, moe=MIXTRAL_MOE),
        "hf-mixtral": ModelConfig(**mixtral, moe=MIXTRAL_MOE),
        "hf-mixtral-bf16": ModelConfig(**mixtral, moe=MIXTRAL_MOE),
    }


def hf_mixtral(config: ModelConfig, device: torch.device) -> torch.nn.Module:
    """transformers' MixtralForCausalLM of the same shape, grouped_mm experts, SDPA attention."""
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_config = MixtralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        num_local_experts=config.moe.num_experts,
        num_experts_per_tok=config.moe.top_k,
        router_aux_loss_coef=config.moe.aux_loss_coef,
        output_router_logits=True,
        tie_word_embeddings=False,
        router_jitter_noise=0.0,
    )
    hf_config._experts_implementation = "grouped_mm" if device.type == "cuda" else "eager"
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return MixtralForCausalLM(hf_config).to(device).train()


class HFStep:
    """The same step for a transformers model: bf16 autocast forward (LM + router aux loss, as
    the model computes it), backward, clip at 1.0, fused AdamW."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.bf16 = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=self.bf16)

    def __call__(self, step: int, batches: list[Batch]):
        (batch,) = batches
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(input_ids=batch.input_ids_BS, labels=batch.input_ids_BS)  # HF shifts the labels
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the loss stays on the GPU (read after timing), as a training loop that logs every N
        # steps keeps it: no host synchronisation per step
        return _Result(out.loss.detach())


@dataclass
class _Result:
    loss: torch.Tensor


def moe_paths(model: Transformer) -> set[str]:
    """Record, per MoE layer, the implementation it resolves to for the inputs it receives."""
    seen: set[str] = set()
    for module in model.modules():
        if isinstance(module, MoE):

            def hook(moe, args, seen=seen):
                x_TD = args[0].reshape(-1, args[0].shape[-1])
                seen.add(moe.resolved_implementation(x_TD.to(autocast_dtype(x_TD))))

            module.register_forward_pre_hook(hook)
    return seen


def random_batches(config: ModelConfig, count: int, batch: int, seq_len: int, device) -> list[Batch]:
    generator = torch.Generator(device=device).manual_seed(0)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device, generator=generator)
        batches.append(
            Batch(tokens[:, :-1], tokens[:, 1:], torch.zeros(batch, dtype=torch.long, device=device))
        )
    return batches


def timed(device: torch.device, run) -> float:
    """Seconds one call of `run` takes, from an idle GPU to all its work done (CUDA events)."""
    return timed_back_to_back(device, [run])[0]


def timed_back_to_back(device: torch.device, runs: list) -> list[float]:
    """Seconds of each call of `runs`, called back to back as a training loop does.

    On a GPU an event is recorded between calls and the host synchronises only after the last,
    so each interval is the GPU time from one step boundary to the next: a step whose host work
    (the next forward's launches) overlaps the previous step's queued kernels is not charged
    for it, and one whose host stalls the GPU is.
    """
    if device.type != "cuda":
        seconds = []
        for run in runs:
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        return seconds
    torch.cuda.synchronize(device)
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(runs) + 1)]
    marks[0].record()
    for run, mark in zip(runs, marks[1:], strict=True):
        run()
        mark.record()
    marks[-1].synchronize()
    return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(marks)]


def build_step(name: str, config: ModelConfig, args, device: torch.device):
    """The model of case `name` and the callable that runs one training step on it."""
    bf16 = device.type == "cuda"
    if name.startswith("hf-"):
        model = hf_mixtral(config, device)
        if name.endswith("-bf16") and bf16:
            # bf16 weights (perf.md's anchor, presumably): _grouped_mm is not on autocast's
            # cast lists, so with fp32 master weights transformers' expert GEMMs run in fp32
            model = model.to(torch.bfloat16)
        if args.compile:
            for layer in model.model.layers:
                layer.compile()
        return model, HFStep(model, device)
    model = init_weights(Transformer(config), seed=0).to(device).train()
    if name.endswith("-bf16w") and bf16:
        cast_to_bf16_weights(model)  # `precision: bf16-weights`: like for like with hf-mixtral-bf16
    if args.compile:
        compile_blocks(model)
    graphed = args.cuda_graph and device.type == "cuda"
    return model, benchmark_step(
        model, Distributed(device=device), compile_loss=args.compile, cuda_graph=graphed
    )


def bench_case(
    name: str, config: ModelConfig, args, device: torch.device, ceiling: float | None = None
) -> Row:
    bf16 = device.type == "cuda"
    model, step = build_step(name, config, args, device)
    paths = {"hf grouped_mm" if bf16 else "hf eager"} if name.startswith("hf-") else moe_paths(model)
    batches = random_batches(config, args.warmup + args.steps, args.batch, args.seq_len, device)
    if bf16:
        torch.cuda.reset_peak_memory_stats(device)
    results = []
    first = timed(device, lambda: results.append(step(1, [batches[0]])))
    for index in range(1, args.warmup):
        results.append(step(index + 1, [batches[index]]))
    timed_steps = range(args.warmup, args.warmup + args.steps)
    in_flight: list = []

    def read_all() -> None:
        while in_flight:
            results.append(in_flight.pop(0).result())

    def run(index: int) -> None:
        if isinstance(step, TrainStep):
            # as the trainer runs them: step s launched, then step s - 1 read (a graphed step
            # is still running on the GPU while the host reads the one before it)
            in_flight.append(step.launch(index + 1, [batches[index]]))
            if len(in_flight) > 1:
                results.append(in_flight.pop(0).result())
        else:
            results.append(step(index + 1, [batches[index]]))

    times = timed_back_to_back(device, [lambda index=index: run(index) for index in timed_steps])
    read_all()
    # the same steps, each started on an idle GPU and waited for, values read (the previous protocol)
    some = list(timed_steps)[: max(3, len(timed_steps) // 3)]
    isolated = [timed(device, lambda index=index: (run(index), read_all())) for index in some]
    assert all(math.isfinite(float(r.loss)) for r in results), "a non-finite loss: the figures would be wrong"
    seconds = statistics.median(times)
    tokens = args.batch * args.seq_len
    flops_per_token = training_flops_per_token(config, args.seq_len)
    tokens_per_s = tokens / seconds
    achieved = tokens_per_s * flops_per_token
    return Row(
        case=name,
        parameters=total_parameters(config),
        active=active_parameters(config),
        tokens_per_step=tokens,
        first_step_s=first,
        step_ms=seconds * 1000,
        tokens_per_s=tokens_per_s,
        tflops=achieved / 1e12,
        mfu=achieved / H100_BF16_MEASURED_FLOPS if bf16 else None,
        mfu_datasheet=achieved / H100_BF16_DATASHEET_FLOPS if bf16 else None,
        mfu_card=achieved / ceiling if bf16 and ceiling else None,
        peak_gb=torch.cuda.max_memory_allocated(device) / 2**30 if bf16 else None,
        moe_path=",".join(sorted(paths)) or "-",
        loss=float(results[-1].loss),
        isolated_step_ms=statistics.median(isolated) * 1000,
    )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def print_table(
    rows: list[Row], args, device: torch.device, ceiling: tuple[float, int] | None = None
) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    card = (
        ""
        if ceiling is None
        else f"; this card's matmul ceiling {ceiling[0] / 1e12:.0f} TFLOP/s (bf16 {ceiling[1]}³)"
    )
    print(
        f"{run_header(name)}; "
        f"batch {args.batch} × {args.seq_len}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
        f"compile {args.compile}, CUDA graph {args.cuda_graph and device.type == 'cuda'}; median of {args.steps} steps"
        f"{card}"
    )
    print(
        "| case | params | active | tokens/step | first step s | step ms | isolated ms | tokens/s | TFLOP/s | "
        "MFU (790) | MFU (card) | MFU (989) | peak GB | moe path | loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r.peak_gb is None else f"{r.peak_gb:.1f}"
        print(
            f"| {r.case} | {r.parameters / 1e6:.1f}M | {r.active / 1e6:.1f}M | {r.tokens_per_step:,} | "
            f"{r.first_step_s:.2f} | {r.step_ms:.1f} | {r.isolated_step_ms:.1f} | {r.tokens_per_s:,.0f} | {r.tflops:.1f} | "
            f"{_percent(r.mfu)} | {_percent(r.mfu_card)} | {_percent(r.mfu_datasheet)} | {peak} | {r.moe_path} | "
            f"{r.loss:.3f} |"
        )


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", "--cpu-smoke", action="store_true", help="tiny models on the CPU: a smoke test"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["dense", "btx4"],
        choices=["dense", "btx4", "mixtral", "mixtral-bf16w", "hf-mixtral", "hf-mixtral-bf16"],
    )
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (one micro-batch)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=15, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (≥ 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="ours: replay the whole step as one CUDA graph (train.cuda_graph; GPU only, ignored on the CPU)",
    )
    parser.add_argument(
        "--keep-rows",
        action="store_true",
        help="compiled MoE layers keep their dispatched rows for backward instead of gathering them "
        "again (grouped_moe.KEEP_DISPATCHED_ROWS_COMPILED; rows labelled 'rows kept')",
    )
    parser.add_argument(
        "--no-ceiling",
        action="store_true",
        help="skip measuring this card's bf16 matmul ceiling (the 'MFU (card)' column; a few seconds)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.keep_rows:
        from upcycle.kernels import grouped_moe

        grouped_moe.KEEP_DISPATCHED_ROWS_COMPILED = True
    if args.tiny:
        args.batch, args.seq_len, args.steps, args.warmup = 2, 32, 3, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    configs = case_configs(args.tiny)
    # the card's own ceiling, measured before the cases (MFU (card)); perf.md's 790 stays the headline
    ceiling = matmul_ceiling(device) if device.type == "cuda" and not args.no_ceiling else None
    rows = [bench_case(name, configs[name], args, device, ceiling and ceiling[0]) for name in args.cases]
    for row in rows if args.keep_rows else []:
        row.case += ", rows kept"
    print_table(rows, args, device, ceiling)
    if args.json is not None:
        record = {
            "device": str(device),
            "matmul_ceiling_flops": ceiling and ceiling[0],
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(record, indent=1))
    return rows


if __name__ == "__main__":
    main()
