"""`PipelineConfig`: one YAML from a seed to a report (Branch -> Train -> Mix -> Finetune ->
Evaluate -> Report). Every key is documented in README.md, "Pipeline config".

Data comes from the built-in corpus (`corpus:`) or from the user's files (`data:`), exactly one.
The seed is a checkpoint (`seed.path`) or a fresh model trained on the mixture (`seed.config`).
`mixes` lists what to compare; each entry names a recipe of `upcycle recipes`, or `dense`
(continued training of the seed, the baseline of every paper) or `btm` (the branches kept apart
and mixed at the output by a tf-idf domain router).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from upcycle.corpus.build import DOMAINS as CORPUS_DOMAINS
from upcycle.model.config import ModelConfig, StrictModel
from upcycle.train.config import TrainPrecision

SEED_STARTED = ("dense", "sparse", "nvidia", "drop")  # trained from the seed, on the mixture
BRANCH_STARTED = ("btx", "bam")  # mixed from the branches, then finetuned


class TrainSettings(StrictModel):
    """Optimisation settings of one kind of training stage (seed, branches or finetune)."""

    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    global_batch_size: int = Field(16, gt=0)
    micro_batch_size: int | None = Field(None, gt=0)
    clip_grad_norm: float | None = Field(1.0, gt=0)
    precision: TrainPrecision = "auto"
    checkpoint_every_steps: int = Field(0, ge=0, description="0: only the final step")
    compile: bool = False
    extra: dict[str, Any] = Field(
        default_factory=dict, description="more TrainConfig keys, passed as they are"
    )


class CorpusSection(StrictModel):
    """The built-in corpus (`upcycle.corpus`): code, math and prose domains, and its tokenizer."""

    domains: list[str] = Field(default_factory=lambda: ["code", "math", "english", "french"], min_length=2)
    bytes_per_domain: int = Field(1_000_000, gt=0)
    vocab_size: int = Field(8192, ge=300)
    seed: int = 0
    download: bool = True

    @field_validator("domains")
    @classmethod
    def _built_in_domains(cls, domains: list[str]) -> list[str]:
        unknown = [d for d in domains if d not in CORPUS_DOMAINS]
        if unknown or len(set(domains)) != len(domains):
            raise ValueError(
                f"{unknown or domains} must be distinct names of built-in domains "
                f"({', '.join(CORPUS_DOMAINS)}); fix the list"
            )
        return domains


class DomainFiles(StrictModel):
    paths: list[str] = Field(min_length=1)
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"


class DataFiles(StrictModel):
    """The user's own data: files per domain and the tokenizer folder of the seed."""

    domains: dict[str, DomainFiles] = Field(min_length=2)
    tokenizer: Path


class SeedSection(StrictModel):
    """The seed: an existing checkpoint (`path`, used as it is), or a fresh model (`config`)
    trained on the equal mixture of all domains for `steps` steps."""

    path: Path | None = None
    config: ModelConfig | None = None
    steps: int = Field(0, ge=0)
    train: TrainSettings = Field(default_factory=TrainSettings)

    @model_validator(mode="after")
    def _one_source(self) -> SeedSection:
        if (self.path is None) == (self.config is None):
            raise ValueError("seed: give either `path` (a checkpoint) or `config` (a fresh model), not both")
        if self.config is not None and self.steps == 0:
            raise ValueError("seed: a fresh `config` needs `steps` > 0 of training on the mixture")
        return self


class BranchSection(StrictModel):
    """One copy of the seed trained per domain. `launch`: `sequential` (one after another in
    this process), `parallel` (separate processes at once), or `print` (write each branch's
    train YAML, print one command per branch for a cluster scheduler, and stop; rerun the
    pipeline once they are done).

    `parallel` on a machine with GPUs gives each branch its own group of `gpus_per_branch` GPUs
    (`CUDA_VISIBLE_DEVICES`; a group of several runs the branch under torchrun with FSDP2), as
    many branches at once as there are groups (at most `max_parallel` when set); `gpus` limits
    which GPU indices are used. Without GPUs it runs `max_parallel` (default 2) processes and
    splits the CPU threads between them."""

    steps: int = Field(gt=0)
    train: TrainSettings = Field(default_factory=TrainSettings)
    launch: Literal["sequential", "parallel", "print"] = "sequential"
    max_parallel: int | None = Field(None, gt=0)
    gpus_per_branch: int = Field(1, gt=0)
    gpus: list[int] | None = Field(
        None, min_length=1, description="GPU indices to use (default: all visible)"
    )
    domains: list[str] | None = None


class MixSpec(BaseModel):
    """One model to compare: `name`, `recipe` (a recipe name, `dense` or `btm`), and that recipe's
    parameters as further keys (for btm: `top_k`, `temperature`)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    recipe: str

    def parameters(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class BTMParams(StrictModel):
    """The parameters of a `btm` entry of `mixes` (`upcycle.eval.build_btm`)."""

    top_k: int = Field(2, gt=0)
    temperature: float = Field(0.1, gt=0, allow_inf_nan=False)
    chunk_len: int = Field(256, gt=0)
    chunks_per_domain: int = Field(1024, gt=0)


class FinetuneSection(StrictModel):
    """The MoE finetune on the equal mixture. `steps`: the finetune length of the reference
    branched model (the first of btx/bam in `mixes`). `budget: compute_matched` gives every
    model the same total FLOPs (branch training + finetune for branched models; all of it as
    training from the seed for seed-started ones); `steps_matched` gives every model `steps`."""

    steps: int = Field(gt=0)
    train: TrainSettings = Field(default_factory=TrainSettings)
    budget: Literal["compute_matched", "steps_matched"] = "compute_matched"


class EvalSection(StrictModel):
    max_sequences: int | None = Field(32, gt=0, description="held-out windows per domain (null: all)")
    batch_size: int = Field(8, gt=0)


class PipelineConfig(StrictModel):
    output: Path
    seq_len: int = Field(gt=0)
    random_seed: int = Field(0, description="seeds every stage")
    heldout_fraction: float = Field(0.05, gt=0, lt=1)
    corpus: CorpusSection | None = None
    data: DataFiles | None = None
    seed: SeedSection
    branches: BranchSection
    mixes: list[MixSpec] = Field(min_length=1)
    finetune: FinetuneSection
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if (self.corpus is None) == (self.data is None):
            raise ValueError("give either `corpus` (the built-in corpus) or `data` (your files), not both")
        domains = self.domain_names()
        unknown = [d for d in self.branches.domains or [] if d not in domains]
        if unknown:
            raise ValueError(
                f"branches.domains names {unknown}, which the data does not have ({', '.join(domains)}); "
                "fix the list"
            )
        names = [m.name for m in self.mixes]
        if len(set(names)) != len(names):
            raise ValueError("mixes: every entry needs its own `name`")
        if self.finetune.budget == "compute_matched" and not self.reference_mix():
            raise ValueError(
                "finetune.budget compute_matched needs a btx or bam entry in mixes as the reference"
            )
        return self

    def domain_names(self) -> list[str]:
        return list(self.corpus.domains) if self.corpus is not None else list(self.data.domains)

    def branch_domains(self) -> list[str]:
        return self.branches.domains or self.domain_names()

    def reference_mix(self) -> MixSpec | None:
        return next((m for m in self.mixes if m.recipe in BRANCH_STARTED), None)
