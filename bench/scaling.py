"""Weak scaling of the BTX MoE finetune: tokens/s per GPU at 1, 2, 4 and 8 GPUs, FSDP2 + EP.

What is timed: the trainer's own step (`upcycle.train.TrainStep`, as in bench/train_step.py):
forward under bf16 autocast, loss = LM + aux, backward, FSDP2 reduce-scatter, the global
gradient norm, clipping at 1.0, fused AdamW, one host synchronisation. Each rank reads its own
micro-batch of `--batch` random sequences of `--seq-len` tokens (made on the GPU beforehand), so
the global batch grows with the number of GPUs: weak scaling. Perfect scaling keeps tokens/s per
GPU constant; `efficiency` is tokens/s per GPU over that of the smallest run of the same `--ep`
setting (1 GPU by default).

Model: BTX-shaped, ≈1.03B parameters (≈0.54B active per token). A Llama-layout dense seed
(vocab 32000, D 1024, 18 layers, 16 heads, 8 KV heads, F 4096, untied embeddings, ≈0.35B) whose
every FFN becomes 4 experts of width 4096, top-2 topk_softmax routing, BTX load balancing 0.01:
what `upcycle convert` (recipe btx) makes from 4 branches. Weights are random (N(0, 0.02²), as
`upcycle init`); speed does not depend on them, and a fresh router routes near-uniformly.

Parallelism at N GPUs (`upcycle.train.distributed.shard_model`, the trainer's own code):
FSDP2 over all N ranks for everything but the experts; `--ep auto` shards the experts over
ep = gcd(N, 4) ranks (1, 2, 4, 4 at 1, 2, 4, 8 GPUs) and FSDP2-shards them over the other N/ep;
`--ep 1` is FSDP2 alone; several values (`--ep auto 1`) run each, one row per (N, ep).

Protocol: one `torchrun --standalone --nproc-per-node N` launch per row (the GPUs of one host);
`--warmup` untimed steps, then the median of `--steps` timed steps (wall time after a CUDA
synchronisation; the step ends with a host sync anyway), the slowest rank's median counts.
Peak memory: the largest `torch.cuda.max_memory_allocated` over ranks. MFU against 790 TFLOP/s
(measured bf16 matmul ceiling of an H100), FLOPs from `upcycle.model.flops`.

Environment, always (the driver's and every worker's): NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 (NVLink multicast stays off).

Usage (a host with 8 GPUs):
    python bench/scaling.py [--gpus 1 2 4 8] [--ep auto 1] [--batch 8] [--seq-len 2048]
                            [--steps 10] [--warmup 3] [--compile] [--json scaling.json]
CPU smoke:
    python bench/scaling.py --smoke      (gloo, a tiny model, 1 and 2 processes, seconds;
                                          its figures mean nothing)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

NCCL_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
os.environ.update(NCCL_ENV)  # before torch.distributed is touched, in the driver and in workers

import torch  # noqa: E402

NUM_EXPERTS = 4
SEED_1B = dict(  # the dense seed; its MoE is ≈1.03B parameters
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=18,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=2048,
)
SEED_TINY = dict(
    vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
BTX4 = dict(num_experts=NUM_EXPERTS, top_k=2, routing="topk_softmax", aux_loss="btx", aux_loss_coef=0.01)


@dataclass
class Row:
    gpus: int
    ep: int
    dp: int
    device: str
    parameters: int
    active: int
    tokens_per_step: int
    step_ms: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float | None
    peak_gb: float | None
    loss: float
    efficiency: float | None = None


def model_config(smoke: bool):
    from upcycle.model import ModelConfig

    return ModelConfig(**(SEED_TINY if smoke else SEED_1B), moe=BTX4)


def resolve_ep(setting: str, gpus: int) -> int:
    """`auto`: gcd(gpus, experts); an integer is taken as given (it must divide both)."""
    ep = math.gcd(gpus, NUM_EXPERTS) if setting == "auto" else int(setting)
    if gpus % ep or NUM_EXPERTS % ep:
        raise SystemExit(f"--ep {ep} must divide the {gpus} GPU(s) and the {NUM_EXPERTS} experts")
    return ep


# --- one torchrun job --------------------------------------------------------------------------


def worker(args) -> None:
    """One rank of one row: build, shard, warm up, time; rank 0 writes the row to `args.out`."""
    import torch.distributed as dist

    from upcycle.data import Batch
    from upcycle.model import Transformer
    from upcycle.model.flops import active_parameters, total_parameters, training_flops_per_token
    from upcycle.model.init import init_weights
    from upcycle.train.build import compile_blocks
    from upcycle.train.distributed import Distributed, shard_model
    from upcycle.train.metrics import H100_BF16_MEASURED_FLOPS
    from upcycle.train.step import benchmark_step

    distributed = Distributed.from_env()
    try:
        device, world = distributed.device, distributed.world_size
        cuda = device.type == "cuda"
        config = model_config(args.smoke)
        model = init_weights(Transformer(config), seed=0).to(device).train()
        shard_model(model, distributed, args.ep)
        if args.compile:
            compile_blocks(model)
        step = benchmark_step(model, distributed, compile_loss=args.compile)
        generator = torch.Generator(device=device).manual_seed(1000 + distributed.rank)
        batches = []
        for _ in range(args.warmup + args.steps):
            shape = (args.batch, args.seq_len + 1)
            tokens = torch.randint(0, config.vocab_size, shape, device=device, generator=generator)
            domains = torch.zeros(args.batch, dtype=torch.long, device=device)
            batches.append(Batch(tokens[:, :-1], tokens[:, 1:], domains))
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        results, times = [], []
        for index, batch in enumerate(batches):
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            results.append(step(index + 1, [batch]))
            if cuda:
                torch.cuda.synchronize(device)
            if index >= args.warmup:
                times.append(time.perf_counter() - started)
        local = torch.tensor(
            [statistics.median(times), torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0],
            dtype=torch.float64,
            device=device,
        )
        if distributed.active:
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        seconds, peak = local.tolist()
        if distributed.is_main:
            tokens = args.batch * args.seq_len * world
            per_gpu = tokens / seconds / world
            flops = per_gpu * training_flops_per_token(config, args.seq_len)
            row = Row(
                gpus=world,
                ep=args.ep,
                dp=world // args.ep,
                device=torch.cuda.get_device_name(device) if cuda else "cpu",
                parameters=total_parameters(config),
                active=active_parameters(config),
                tokens_per_step=tokens,
                step_ms=seconds * 1000,
                tokens_per_s=tokens / seconds,
                tokens_per_s_per_gpu=per_gpu,
                tflops_per_gpu=flops / 1e12,
                mfu=flops / H100_BF16_MEASURED_FLOPS if cuda else None,
                peak_gb=peak if cuda else None,
                loss=results[-1].loss,
            )
            Path(args.out).write_text(json.dumps(asdict(row)))
    finally:
        distributed.close()


# --- the driver --------------------------------------------------------------------------------


def launch(gpus: int, ep: int, args, out: Path) -> Row:
    """Run one row under torchrun and read back what rank 0 wrote."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={gpus}",
        str(Path(__file__).resolve()),
        "--worker",
        f"--ep={ep}",
        f"--batch={args.batch}",
        f"--seq-len={args.seq_len}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--out={out}",
    ]
    command += ["--smoke"] if args.smoke else []
    command += ["--compile"] if args.compile else []
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **NCCL_ENV, "PYTHONPATH": path}
    if args.smoke:  # CPU and gloo even where a GPU exists; one thread per rank
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise RuntimeError(f"{gpus} GPU(s), ep {ep}: torchrun exited {done.returncode}\n{tail}")
    return Row(**json.loads(out.read_text()))


def with_efficiency(series: dict[str, list[Row]]) -> None:
    """Efficiency: tokens/s per GPU over the smallest run of the same --ep setting (a row that
    two settings share, such as 1 GPU for `--ep auto 1`, is the base of both)."""
    for rows in series.values():
        base = min(rows, key=lambda r: r.gpus)
        for row in rows:
            if row.efficiency is None:
                row.efficiency = row.tokens_per_s_per_gpu / base.tokens_per_s_per_gpu


def _fmt(value: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if value is None else format(value * scale, spec) + unit


def print_table(rows: list[Row], args) -> None:
    from benchlib import run_header

    first = rows[0]
    print(
        f"{run_header(first.device)}; "
        f"BTX 4-expert MoE, {first.parameters / 1e6:,.1f}M parameters ({first.active / 1e6:,.1f}M active); "
        f"{args.batch} × {args.seq_len} tokens per GPU per step; "
        f"{'fp32 (smoke)' if args.smoke else 'bf16 autocast'}, compile {args.compile}; "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(
        "| GPUs | ep | dp | tokens/step | step ms | tokens/s | tokens/s/GPU | TFLOP/s/GPU | MFU (790) | "
        "peak GB | weak-scaling efficiency | loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.gpus} | {r.ep} | {r.dp} | {r.tokens_per_step:,} | {r.step_ms:.1f} | {r.tokens_per_s:,.0f} | "
            f"{r.tokens_per_s_per_gpu:,.0f} | {r.tflops_per_gpu:.1f} | {_fmt(r.mfu, '.1f', 100, '%')} | "
            f"{_fmt(r.peak_gb, '.1f')} | {_fmt(r.efficiency, '.1f', 100, '%')} | {r.loss:.3f} |"
        )


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="world sizes, one row each")
    parser.add_argument(
        "--ep", nargs="+", default=["auto"], help="expert parallel size(s): auto or an integer"
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU per step (one micro-batch)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (≥ 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny model, 1 and 2 processes")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one torchrun launch may take")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.ep = int(args.ep[0])
        worker(args)
        return []
    if args.smoke:
        args.gpus, args.batch, args.seq_len, args.steps, args.warmup = [1, 2], 2, 32, 2, 1
    elif not torch.cuda.is_available() or torch.cuda.device_count() < max(args.gpus):
        raise SystemExit(
            f"--gpus {max(args.gpus)} needs that many CUDA GPUs on this host, torch sees "
            f"{torch.cuda.device_count()}; use --gpus with fewer, or --smoke on a CPU"
        )
    done: dict[tuple[int, int], Row] = {}
    series: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory(prefix="upcycle-scaling-") as scratch:
        for setting in args.ep:
            for gpus in args.gpus:
                ep = resolve_ep(setting, gpus)
                if (gpus, ep) not in done:  # `--ep auto 1` at 1 GPU is one run, not two
                    row = launch(gpus, ep, args, Path(scratch) / f"row-{gpus}-{ep}.json")
                    done[(gpus, ep)] = row
                    per_gpu = row.tokens_per_s_per_gpu
                    print(f"scaling: {gpus} GPU(s), ep {ep}: {per_gpu:,.0f} tokens/s per GPU", flush=True)
                series.setdefault(setting, []).append(done[(gpus, ep)])
    with_efficiency(series)
    rows = list(done.values())
    print_table(rows, args)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows]}, indent=1))
    return rows


if __name__ == "__main__":
    main()
