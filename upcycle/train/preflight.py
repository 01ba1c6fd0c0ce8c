"""Everything checked before a model is built or a file written, and the numbers derived from it.

`plan_run` refuses, each with one sentence naming the fix: missing or unprepared data; a model
folder that is missing or unsupported; data tokenised with another tokenizer than the model's;
token ids beyond the model's vocabulary; a batch that does not split over ranks and
micro-batches; a FLOP or token budget smaller than one step; evaluation asked for on data with
no held-out split; a `parallel.expert_parallel` that does not divide the world size or the
number of experts (or a model without MoE layers); and an output folder that already holds a run
(unless resuming).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from upcycle.checkpoint.loading import load_config
from upcycle.data import Manifest, check_tokenizer_matches, load_manifest
from upcycle.errors import UpcycleError
from upcycle.model.config import ModelConfig
from upcycle.model.flops import training_flops_per_token
from upcycle.train.checkpointing import complete_checkpoints
from upcycle.train.config import BatchConfig, TrainConfig
from upcycle.train.evaluation import eval_domains


@dataclass(frozen=True)
class RunPlan:
    manifest: Manifest
    model_config: ModelConfig
    tokenizer_dir: Path | None  # copied into the final checkpoint
    micro_batch_size: int
    grad_accumulation: int
    total_steps: int
    tokens_per_step: int
    flops_per_token: int
    eval_domains: list[str]

    @property
    def flops_per_step(self) -> float:
        return float(self.flops_per_token) * self.tokens_per_step


def batch_layout(batch: BatchConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) for one rank."""
    if batch.global_batch_size % world_size:
        raise UpcycleError(
            f"batch.global_batch_size {batch.global_batch_size} does not split over {world_size} ranks; "
            f"use a multiple of {world_size}"
        )
    local = batch.global_batch_size // world_size
    micro, accumulation = batch.micro_batch_size, batch.grad_accumulation
    if micro is None:
        accumulation = accumulation or 1
        if local % accumulation:
            raise UpcycleError(
                f"each rank's {local} sequences do not split into batch.grad_accumulation {accumulation} "
                "equal micro-batches; change one of them"
            )
        return local // accumulation, accumulation
    if local % micro:
        raise UpcycleError(
            f"batch: each of {world_size} rank(s) reads {local} sequences, which micro_batch_size {micro} "
            f"does not divide; make global_batch_size a multiple of {micro * world_size}"
        )
    if accumulation is not None and micro * accumulation != local:
        raise UpcycleError(
            f"batch: micro_batch_size {micro} × grad_accumulation {accumulation} × {world_size} rank(s) is "
            f"not global_batch_size {batch.global_batch_size}; give only one of micro_batch_size and "
            "grad_accumulation"
        )
    return micro, local // micro


def _model_config_and_tokenizer(config: TrainConfig, manifest: Manifest) -> tuple[ModelConfig, Path | None]:
    source = config.model
    if source.path is not None:
        model_config = load_config(source.path)
        tokenizer = source.tokenizer or source.path
    else:
        model_config = source.config
        recorded = Path(manifest.tokenizer.path)
        tokenizer = source.tokenizer or (recorded if recorded.is_dir() else recorded.parent)
    if source.path is not None or source.tokenizer is not None:
        check_tokenizer_matches(manifest, tokenizer)
    if model_config.vocab_size < manifest.tokenizer.id_upper_bound:
        raise UpcycleError(
            f"the data holds token ids up to {manifest.tokenizer.id_upper_bound - 1} but the model's "
            f"vocab_size is {model_config.vocab_size}; use a model with the data's tokenizer"
        )
    return model_config, tokenizer if tokenizer.is_dir() else None


def _total_steps(config: TrainConfig, tokens_per_step: int, flops_per_step: float) -> int:
    stop = config.stop
    if stop.max_steps is not None:
        return stop.max_steps
    budget, per_step = (
        (stop.max_tokens, tokens_per_step)
        if stop.max_tokens is not None
        else (stop.max_flops, flops_per_step)
    )
    return max(1, math.ceil(budget / per_step))


def check_expert_parallel(ep: int, model_config: ModelConfig, world_size: int) -> None:
    """ep must divide the world size and the number of routed experts of an MoE model."""
    if ep == 1:
        return
    if model_config.moe is None:
        raise UpcycleError(
            f"parallel.expert_parallel is {ep} but the model has no MoE layer to shard; "
            "set parallel.expert_parallel: 1"
        )
    experts = model_config.moe.num_experts
    if world_size % ep:
        raise UpcycleError(
            f"parallel.expert_parallel {ep} does not divide the {world_size} rank(s) of this run; "
            f"use a divisor of {world_size} (1 on one process), or launch a multiple of {ep} ranks"
        )
    if experts % ep:
        raise UpcycleError(
            f"parallel.expert_parallel {ep} does not divide the model's {experts} experts; "
            f"use a divisor of {experts} that also divides the {world_size} rank(s)"
        )


def check_output(output: Path, resume: bool) -> None:
    """A fresh run refuses an output folder that already holds checkpoints or a final model."""
    if resume:
        return
    found = complete_checkpoints(output / "checkpoints")
    if found or (output / "final").exists():
        what = f"checkpoints up to step {found[-1][0]}" if found else "a final model"
        raise UpcycleError(
            f"{output} already holds {what} of a run; pass --resume to continue it, or choose another output"
        )


def plan_run(config: TrainConfig, world_size: int, resume: bool) -> RunPlan:
    if not Path(config.data.path).is_dir():
        raise UpcycleError(
            f"data folder {config.data.path} does not exist; run `upcycle data prepare` into it first"
        )
    manifest = load_manifest(config.data.path)
    model_config, tokenizer = _model_config_and_tokenizer(config, manifest)
    micro, accumulation = batch_layout(config.batch, world_size)
    check_expert_parallel(config.parallel.expert_parallel, model_config, world_size)
    seq_len = config.data.seq_len
    tokens_per_step = config.batch.global_batch_size * seq_len
    flops_per_token = training_flops_per_token(model_config, seq_len)
    total_steps = _total_steps(config, tokens_per_step, float(flops_per_token) * tokens_per_step)
    domains = eval_domains(manifest, seq_len) if config.eval.every_steps or config.eval.at_end else []
    if config.eval.every_steps and not domains:
        raise UpcycleError(
            f"eval.every_steps is {config.eval.every_steps} but no domain of {config.data.path} has "
            f"{seq_len + 1} held-out tokens; prepare the data with a held-out split or set eval.every_steps: 0"
        )
    check_output(Path(config.output), resume)
    return RunPlan(
        manifest,
        model_config,
        tokenizer,
        micro,
        accumulation,
        total_steps,
        tokens_per_step,
        flops_per_token,
        domains,
    )
