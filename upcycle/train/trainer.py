"""`Trainer`: the one training loop for dense, MoE and BAM models, alone or under torchrun.

A run, in order:
1. preflight (`plan_run`): every refusal before any model is built or file written;
2. the data stream for this rank (`TrainBatches`: this rank's slice of each global batch);
3. the model, built in the order of `upcycle.train.build`; the optimiser and schedule;
4. with `resume`, the newest complete checkpoint: weights, optimiser, sampler, RNG, counters;
5. steps: read one global batch (this rank's slice), split it into micro-batches, `TrainStep`;
   log; evaluate and checkpoint when due;
6. the final model, in the native format, in OUTPUT/final (tokenizer files copied).

Side concerns stay outside the step: metrics (`metrics.py`), checkpoints (`checkpointing.py`),
evaluation (`evaluation.py`). Step numbers are 1-based: "step 10" is the tenth optimiser step,
and the checkpoint `step-00000010` holds the state after it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from upcycle.checkpoint.atomic import atomic_write_bytes
from upcycle.checkpoint.native import save_native
from upcycle.data import Batch, TrainBatches
from upcycle.errors import UpcycleError
from upcycle.model.flops import active_parameters
from upcycle.model.transformer import Transformer
from upcycle.train.build import (
    apply_activation_checkpointing,
    build_model,
    cast_to_bf16_weights,
    compile_blocks,
    parameter_count,
)
from upcycle.train.checkpointing import Checkpointer, seed_rng
from upcycle.train.config import TrainConfig
from upcycle.train.distributed import Distributed, shard_model
from upcycle.train.evaluation import evaluate_heldout
from upcycle.train.metrics import MetricsWriter, TrainProgress, train_record
from upcycle.train.optim import build_optimizer, freeze_parameters
from upcycle.train.pending import PendingStep
from upcycle.train.preflight import plan_run
from upcycle.train.schedule import WarmupCosine
from upcycle.train.step import NonFiniteLossError, StepResult, TrainStep
from upcycle.yaml_config import load_yaml_model


@dataclass
class TrainResult:
    """What a finished run did; `final_dir` is None on ranks other than 0."""

    steps: int
    tokens: int
    flops: float
    last: StepResult | None
    eval: dict[str, dict[str, float]] = field(default_factory=dict)
    final_dir: Path | None = None


@dataclass
class Counters:
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    consecutive_skips: int = 0


def split_batch(batch: Batch, micro_batch_size: int) -> list[Batch]:
    return [
        Batch(
            batch.input_ids_BS[start : start + micro_batch_size],
            batch.labels_BS[start : start + micro_batch_size],
            batch.domain_ids_B[start : start + micro_batch_size],
        )
        for start in range(0, batch.input_ids_BS.shape[0], micro_batch_size)
    ]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """`torch.use_deterministic_algorithms` for the run only (CUDA also needs a cuBLAS workspace)."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool = False, quiet: bool = False) -> None:
        self.config, self.resume, self.quiet = config, resume, quiet
        self.counters = Counters()
        self._training = False  # inside the step loop: decides what out-of-memory advice to give

    def run(self) -> TrainResult:
        distributed = Distributed.from_env()
        try:
            with deterministic_algorithms(self.config.deterministic):
                return self._run(distributed)
        except torch.cuda.OutOfMemoryError as error:
            raise UpcycleError(self._out_of_memory_advice()) from error
        except OSError as error:  # metrics or the final model on a full disk (checkpoints say it themselves)
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UpcycleError(
                f"disk full while writing under {self.config.output} ({error.strerror}); free some space "
                "and rerun with --resume"
            ) from error
        finally:
            distributed.close()

    def _run(self, distributed: Distributed) -> TrainResult:
        config = self.config
        self.distributed = distributed
        self.plan = plan = plan_run(config, distributed.world_size, self.resume)
        output = Path(config.output)
        batches = TrainBatches(
            plan.manifest,
            config.data.seq_len,
            config.batch.global_batch_size,
            weights=config.data.weights,
            seed=config.data.seed,
            rank=distributed.rank,
            world_size=distributed.world_size,
        )
        self.model = self._build_model()
        optimizer = build_optimizer(self.model, config.optimizer, distributed.device)
        schedule = WarmupCosine(
            config.optimizer.lr,
            config.schedule.warmup_steps,
            config.schedule.decay_steps or plan.total_steps,
            config.schedule.min_lr_ratio,
        )
        self.autocast_dtype = self._autocast_dtype()
        self.train_step = TrainStep(
            self.model,
            optimizer,
            schedule,
            distributed,
            clip_grad_norm=config.clip_grad_norm,
            autocast_dtype=self.autocast_dtype,
            nonfinite_policy=config.nonfinite.policy,
            compile_loss=config.compile,
            cuda_graph=config.cuda_graph,
        )
        self.checkpointer = Checkpointer(
            output / "checkpoints", config.checkpoint.keep_last_k, distributed, plan.model_config
        )
        self.checkpointer.check_space_for_run(
            config.checkpoint.every_steps > 0,
            getattr(torch, config.checkpoint.final_dtype),
            self.trainable_parameters,
        )
        seed_rng(config.seed, distributed.rank)
        self._maybe_resume(optimizer, batches)
        if distributed.is_main:  # only now: a refused run leaves no output folder
            output.mkdir(parents=True, exist_ok=True)
            dumped = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
            atomic_write_bytes(output / "train_config.yaml", dumped.encode())
        metrics = MetricsWriter(
            config.metrics_path,
            output / "tensorboard" if config.log.tensorboard else None,
            enabled=distributed.is_main,
        )
        metrics.start(self.counters.step)
        try:
            last, evaluation = self._loop(batches, optimizer, schedule, metrics)
        finally:
            metrics.close()
        final_dir = self._save_final()
        return TrainResult(
            self.counters.step, self.counters.tokens, self.counters.flops, last, evaluation, final_dir
        )

    def _build_model(self) -> Transformer:
        config, distributed = self.config, self.distributed
        torch.manual_seed(config.seed)  # construction-time randomness is the same on every rank
        model = build_model(config.model)
        freeze_parameters(model, config.freeze)
        total, trainable = parameter_count(model)
        self.trainable_parameters = trainable
        model.to(distributed.device)
        if config.precision == "bf16-weights":
            cast_to_bf16_weights(model)
        if config.activation_checkpointing:
            apply_activation_checkpointing(model)
        shard_model(model, distributed, config.parallel.expert_parallel)
        if config.compile:
            compile_blocks(model)
        ep = config.parallel.expert_parallel
        self._say(
            f"training {total:,} parameters ({trainable:,} trainable, "
            f"{active_parameters(self.plan.model_config):,} active per token) for "
            f"{self.plan.total_steps} steps of {self.plan.tokens_per_step:,} tokens on "
            f"{distributed.world_size} × {distributed.device.type}"
            + (f", experts sharded over groups of {ep} ranks" if ep > 1 else "")
        )
        return model

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.config.precision
        if precision == "auto":
            precision = "bf16" if self.distributed.device.type == "cuda" else "fp32"
        return torch.bfloat16 if precision in ("bf16", "bf16-weights") else None

    def _maybe_resume(self, optimizer: torch.optim.Optimizer, batches: TrainBatches) -> None:
        if not self.resume:
            return
        latest = self.checkpointer.latest()
        if latest is None:
            self._say(f"no checkpoint in {self.checkpointer.root}; starting from step 0")
            return
        state = self.checkpointer.load(latest, self.model, optimizer)
        batches.load_state_dict(state["data"])
        self.counters = Counters(
            state["step"], state["tokens"], float(state["flops"]), state["consecutive_skips"]
        )
        self._say(f"resumed from {latest} (step {state['step']})")

    def _loop(
        self,
        batches: TrainBatches,
        optimizer: torch.optim.Optimizer,
        schedule: WarmupCosine,
        metrics: MetricsWriter,
    ) -> tuple[StepResult | None, dict]:
        config, plan = self.config, self.plan
        last: StepResult | None = None
        evaluation: dict = {}
        # A run killed after its last step's evaluation was logged does not evaluate it again.
        logged = self.distributed.broadcast_object(self.counters.step in metrics.evaluated_steps)
        evaluated_at = self.counters.step if logged else -1
        show = self.distributed.is_main and config.log.progress and not self.quiet
        self._training = True
        with TrainProgress(plan.total_steps, self.counters.step, enabled=show) as progress:
            # Step s + 1 is launched before step s is read (`TrainStep.launch`): a graphed step
            # is queued in microseconds, so the GPU runs it while the host logs step s and loads
            # the next batch. Eager steps have run when launch returns and are read at once. A
            # step after which the run evaluates or saves is read first, so that both see exactly
            # its weights. (With the skip policy, a step queued behind the one that reaches
            # `max_consecutive_skips` has updated the weights in memory when the run stops; the
            # run saves nothing after it.)
            pending: PendingStep | None = None
            self._read_at = time.perf_counter()
            for step in range(self.counters.step + 1, plan.total_steps + 1):
                try:
                    launched = self.train_step.launch(step, split_batch(next(batches), plan.micro_batch_size))
                except BaseException:
                    if pending is not None:  # logged (or its own error raised) first
                        self._read(pending, metrics, progress)
                    raise
                if pending is not None:
                    last = self._read(pending, metrics, progress)
                pending = launched
                evaluate = bool(config.eval.every_steps and step % config.eval.every_steps == 0)
                every = config.checkpoint.every_steps
                save = bool(every and (step % every == 0 or step == plan.total_steps))
                if pending.done or evaluate or save or step == plan.total_steps:
                    last, pending = self._read(pending, metrics, progress), None
                    if evaluate:
                        evaluation, evaluated_at = self._evaluate(metrics), step
                    if save:
                        self.checkpointer.save(
                            step, self.model, optimizer, self._trainer_state(batches, schedule)
                        )
                    self._read_at = time.perf_counter()  # the next step's rate leaves these out
        if config.eval.at_end and plan.eval_domains and evaluated_at != self.counters.step:
            evaluation = self._evaluate(metrics)
        return last, evaluation

    def _read(self, pending: PendingStep, metrics: MetricsWriter, progress: TrainProgress) -> StepResult:
        """A launched step's values on the host: counted, logged, shown. Its rate is over the
        time since the previous step was read (steps overlap, so that is the time a step takes)."""
        result = pending.result()
        now = time.perf_counter()
        tokens_per_s = self.plan.tokens_per_step / max(now - self._read_at, 1e-9)
        self._read_at = now
        self._count(result)
        if result.step % self.config.log.every_steps == 0 or result.step == self.plan.total_steps:
            metrics.write(self._train_record(result, tokens_per_s))
        progress.update(result, tokens_per_s)
        return result

    def _count(self, result: StepResult) -> None:
        counters = self.counters
        counters.step = result.step
        counters.tokens += self.plan.tokens_per_step
        counters.flops += self.plan.flops_per_step
        counters.consecutive_skips = counters.consecutive_skips + 1 if result.skipped else 0
        limit = self.config.nonfinite.max_consecutive_skips
        if counters.consecutive_skips >= limit:
            raise NonFiniteLossError(
                f"step {result.step}: {limit} steps in a row had a non-finite loss or gradient norm and "
                "were skipped; lower optimizer.lr or check the data, and resume from the last checkpoint"
            )

    def _train_record(self, result: StepResult, tokens_per_s: float) -> dict:
        return train_record(
            result,
            tokens=self.counters.tokens,
            flops=self.counters.flops,
            tokens_per_s=tokens_per_s,
            flops_per_token=self.plan.flops_per_token,
            world_size=self.distributed.world_size,
            gpu_bf16=self.distributed.device.type == "cuda" and self.autocast_dtype == torch.bfloat16,
        )

    def _evaluate(self, metrics: MetricsWriter) -> dict[str, dict[str, float]]:
        config, plan = self.config, self.plan
        results = evaluate_heldout(
            self.model,
            plan.manifest,
            plan.eval_domains,
            config.data.seq_len,
            config.eval.batch_size or plan.micro_batch_size,
            config.eval.max_sequences,
            self.distributed,
            self.autocast_dtype,
        )
        metrics.write({"kind": "eval", "step": self.counters.step, "domains": results})
        return results

    def _trainer_state(self, batches: TrainBatches, schedule: WarmupCosine) -> dict:
        counters = self.counters
        return {
            "step": counters.step,
            "tokens": counters.tokens,
            "flops": counters.flops,
            "consecutive_skips": counters.consecutive_skips,
            "data": batches.state_dict(),
            "schedule": schedule.state_dict(),
            "world_size": self.distributed.world_size,
            "config": self.config.model_dump(mode="json"),
        }

    def _save_final(self) -> Path | None:
        """Gather the full model on rank 0 and write OUTPUT/final in the native format."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        final_dir = None
        if self.distributed.is_main:
            with torch.device("meta"):
                final = Transformer(self.plan.model_config)
            final.load_state_dict(state, strict=True, assign=True)
            final_dir = save_native(
                final,
                Path(self.config.output) / "final",
                tokenizer_from=self.plan.tokenizer_dir,
                dtype=getattr(torch, self.config.checkpoint.final_dtype),
                overwrite=True,
                model_card=self._model_card(),
            )
            self._say(f"wrote the trained model to {final_dir}")
        self.distributed.barrier()
        return final_dir

    def _model_card(self) -> str:
        config, counters = self.config, self.counters
        weights = config.data.weights or self.plan.manifest.default_weights()
        return (
            f"A model trained by `upcycle train` for {counters.step} steps ({counters.tokens:,} tokens, "
            f"{counters.flops:.3g} training FLOPs) on the data in `{config.data.path}` with domain weights "
            f"{weights}, from {config.model.path or 'a fresh initialisation'}.\n\n"
            "Load it with `upcycle.load_model(PATH)`, or with transformers' AutoModelForCausalLM after "
            "`import upcycle`.\n"
        )

    def _out_of_memory_advice(self) -> str:
        micro = self.plan.micro_batch_size if self._training else None
        step = self.counters.step + 1
        if micro is None:
            return (
                "CUDA ran out of memory while building the model; use GPUs with more memory or more of them"
            )
        # a captured step keeps the warm-up's memory and the graph's own pool side by side
        graph = ", cuda_graph: false" if self.config.cuda_graph else ""
        if micro > 1:
            return (
                f"CUDA ran out of memory at step {step} with batch.micro_batch_size {micro}; try "
                f"micro_batch_size: {micro // 2} (gradient accumulation keeps the global batch) "
                f"or activation_checkpointing: true{graph}"
            )
        return (
            f"CUDA ran out of memory at step {step} with batch.micro_batch_size 1; try "
            f"activation_checkpointing: true{graph}, a shorter data.seq_len, or more GPUs"
        )

    def _say(self, message: str) -> None:
        if self.distributed.is_main and not self.quiet:
            print(f"upcycle train: {message}", file=sys.stderr, flush=True)


def train(
    config: TrainConfig | dict | str | Path, *, resume: bool = False, quiet: bool = False
) -> TrainResult:
    """Run the training that `config` (a TrainConfig, a dict of its keys, or a YAML path) describes."""
    if isinstance(config, dict):
        from upcycle.errors import validated

        config = validated(TrainConfig, config, "train config")
    elif not isinstance(config, TrainConfig):
        config = load_yaml_model(config, TrainConfig)
    return Trainer(config, resume=resume, quiet=quiet).run()
