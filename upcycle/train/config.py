"""`TrainConfig`: everything one training run needs, validated at construction.

One config trains any model of ours: a dense branch (BTX's "branch" phase, one domain's weight
set to 1), an MoE or BAM model after conversion (the "mix" finetune), or a fresh model from an
inline `ModelConfig`. Every key is documented in README.md, "Train config".

What is checked where:
- here, at construction: types, ranges, exactly-one choices (model path or inline config; one
  stop rule), `keep_last_k ≥ 2`; nothing touches the filesystem, so example YAMLs validate
  anywhere;
- in `upcycle.train.preflight`, before any model is built: that the data and model folders
  exist, that the data was tokenised with the model's tokenizer, that the vocabulary holds every
  token id, that the batch splits evenly over ranks and micro-batches, and that the output folder
  does not already hold another run.

Relative paths are taken relative to the current working directory, as in `DataConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from upcycle.model.config import ModelConfig, StrictModel

FreezeMode = Literal["none", "experts", "attention", "all_but_routers"]


class _StrictModel(StrictModel):
    """Unknown keys are refused, assignments are validated and number fields refuse booleans,
    as in every upcycle config."""


class ModelSource(_StrictModel):
    """Where the weights come from: a checkpoint folder (`path`) or a fresh model (`config`).

    `path`: an HF dense or MoE folder, or an upcycle native folder (e.g. the output of
    `upcycle convert`). `config`: `ModelConfig` keys; the model is initialised with
    N(0, `init_std`²) from `init_seed`, as `upcycle init` does. `tokenizer`: the folder whose
    tokenizer must match the data's (and is copied into the final checkpoint); default: `path`,
    or for a fresh model the tokenizer the data was prepared with.
    """

    path: Path | None = None
    config: ModelConfig | None = None
    init_seed: int = Field(0, ge=0)
    init_std: float = Field(0.02, gt=0)
    tokenizer: Path | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSource:
        if (self.path is None) == (self.config is None):
            raise ValueError("give either `path` (a checkpoint folder) or `config` (a fresh model), not both")
        if self.path is not None and self.model_fields_set & {"init_seed", "init_std"}:
            raise ValueError("`init_seed` and `init_std` only apply to a fresh `config`; remove them")
        return self


class DataSection(_StrictModel):
    """The prepared data (`upcycle data prepare`) and how to read it.

    `weights`: mixture weights by domain name; default: the weights recorded when the data was
    prepared. Domains left out get weight 0 (a BTX branch lists its one domain). `seed`: the
    order of samples; default: the data's seed, so that runs on the same data see the same order.
    """

    path: Path
    seq_len: int = Field(gt=0)
    weights: dict[str, float] | None = None
    seed: int | None = Field(None, ge=0)


class BatchConfig(_StrictModel):
    """`global_batch_size` sequences per optimiser step, over all ranks together.

    Each rank reads `global_batch_size / world_size` of them, in forward passes of
    `micro_batch_size` sequences; their gradients are accumulated, so
    global = micro × accumulation × world size. Give `micro_batch_size` or `grad_accumulation`
    (or both, if they agree); with neither, each rank does one forward pass per step.
    """

    global_batch_size: int = Field(gt=0)
    micro_batch_size: int | None = Field(None, gt=0)
    grad_accumulation: int | None = Field(None, gt=0)


# `auto`: bf16 autocast on CUDA, fp32 on the CPU; `bf16`: bf16 autocast over fp32 master weights;
# `fp32`: no autocast; `bf16-weights`: bf16 autocast over bf16 weights (routers fp32), see
# `upcycle.train.build.cast_to_bf16_weights`.
TrainPrecision = Literal["auto", "bf16", "fp32", "bf16-weights"]


class OptimizerConfig(_StrictModel):
    """AdamW. Weight decay applies to matrices (and embeddings), not to norms and biases.

    `fused`: fused CUDA kernels (torch's fused AdamW, with large tensors updated by upcycle's
    Triton pass when Triton is installed: `upcycle.train.optim.AdamW`); default (null): on CUDA,
    off on CPU.
    """

    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    eps: float = Field(1e-8, gt=0)
    fused: bool | None = None

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimizerConfig:
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas {list(self.betas)} must each be in [0, 1), e.g. [0.9, 0.95]")
        return self


class ScheduleConfig(_StrictModel):
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio × lr`.

    `decay_steps`: the step where the cosine reaches its floor; default: the run's last step.
    Set it when a run may later be extended, so the schedule does not depend on the stop rule.
    """

    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_steps: int | None = Field(None, gt=0)


class StopConfig(_StrictModel):
    """Exactly one of: `max_steps`, `max_tokens` (trained tokens over all ranks) or `max_flops`
    (training FLOPs as `upcycle.model.flops` counts them, for equal-compute comparisons). The
    run does whole steps: it stops at the first step that reaches the budget."""

    max_steps: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    max_flops: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> StopConfig:
        given = [k for k in ("max_steps", "max_tokens", "max_flops") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of max_steps, max_tokens, max_flops (got {given or 'none'})")
        return self


class EvalConfig(_StrictModel):
    """Held-out loss and perplexity per domain, every `every_steps` steps (0: never) and at the
    end (`at_end`). `max_sequences` caps each domain's held-out windows (null: all of them);
    `batch_size` defaults to the micro-batch size."""

    every_steps: int = Field(0, ge=0)
    at_end: bool = True
    max_sequences: int | None = Field(64, gt=0)
    batch_size: int | None = Field(None, gt=0)


class CheckpointConfig(_StrictModel):
    """A resumable checkpoint every `every_steps` steps and at the last step (0: none at all),
    keeping the newest `keep_last_k` (null: all). `final_dtype`: dtype of the final native model,
    which is written at the end whatever `every_steps` is."""

    every_steps: int = Field(0, ge=0)
    keep_last_k: int | None = 2
    final_dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _keep_at_least_two(self) -> CheckpointConfig:
        if self.keep_last_k is not None and self.keep_last_k < 2:
            raise ValueError(
                f"keep_last_k {self.keep_last_k} would keep no earlier checkpoint to go back "
                "to if the newest one holds a diverged model; use 2 or more, or null to keep all"
            )
        return self


class LogConfig(_StrictModel):
    """`metrics`: the JSONL file (default: OUTPUT/metrics.jsonl). `tensorboard`: also write
    OUTPUT/tensorboard when the tensorboard package is installed. `progress`: a progress bar on
    stderr when it is a terminal. `every_steps`: how often a training record is written."""

    metrics: Path | None = None
    tensorboard: bool = True
    progress: bool = True
    every_steps: int = Field(1, gt=0)


class NonFiniteConfig(_StrictModel):
    """What a non-finite loss or gradient norm does. It is always detected before the optimiser
    step. `stop`: end the run with an error naming the step. `skip`: drop that step's update
    (the batch is consumed, the step counted and logged with `skipped: true`), and stop after
    `max_consecutive_skips` skipped steps in a row."""

    policy: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = Field(5, gt=0)


class ParallelConfig(_StrictModel):
    """How the ranks of a torchrun job share the model (one process: nothing to set).

    Data parallelism (FSDP2) over every rank is always on. `expert_parallel` (ep): shard the
    routed experts of every MoE layer over groups of ep ranks, each rank holding E/ep experts and
    receiving the tokens routed to them by all-to-all (`upcycle.train.expert_parallel`); the
    experts are FSDP2-sharded over the remaining world/ep ranks, everything else over the whole
    world. 1 (default) keeps the experts FSDP2-sharded like every other weight. ep must divide
    the world size and the number of experts; checked before the model is built.
    """

    expert_parallel: int = Field(1, gt=0)


class TrainConfig(_StrictModel):
    """One training run; see README.md, "Train config", for every key."""

    model: ModelSource
    data: DataSection
    batch: BatchConfig
    stop: StopConfig
    output: Path
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    clip_grad_norm: float | None = Field(1.0, gt=0)
    freeze: FreezeMode = "none"
    precision: TrainPrecision = "auto"
    compile: bool = False
    cuda_graph: bool = False
    activation_checkpointing: bool = False
    deterministic: bool = False
    seed: int = Field(0, ge=0)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @property
    def metrics_path(self) -> Path:
        return self.log.metrics if self.log.metrics is not None else self.output / "metrics.jsonl"
