"""`upcycle run PIPELINE.yaml`: seed -> branches -> mixes -> finetunes -> evaluation -> report.

Every stage writes into its own folder under `output/` and finishes by writing `DONE.json`
there (atomically); a stage whose marker exists is skipped, so a killed pipeline resumes where it
stopped. Training stages run with `resume=True`, continuing from their last checkpoint.

Compute convention (`finetune.budget: compute_matched`, as BTX's Table 3 and BAM's "CM" rows):
the seed's pre-training is shared by every model and not counted. The reference (the first
btx/bam entry of `mixes`) spends C = (branch training FLOPs, all domains) + (its finetune FLOPs
for `finetune.steps` steps). Every branched model (btx, bam) gets C minus the branch FLOPs for
its finetune (so BAM, dearer per token, sees fewer tokens); every seed-started model (dense
continued training, sparse / nvidia / drop upcycling) gets all of C as training on the mixture
from the seed; BTM trains nothing beyond the branches. FLOPs are counted by
`upcycle.model.flops.training_flops_per_token` (6 x active parameters + attention).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from upcycle.checkpoint.atomic import atomic_write_bytes
from upcycle.checkpoint.loading import load_config
from upcycle.errors import UpcycleError, validated
from upcycle.model.config import ModelConfig
from upcycle.model.flops import training_flops_per_token
from upcycle.pipeline.config import (
    BRANCH_STARTED,
    SEED_STARTED,
    BTMParams,
    MixSpec,
    PipelineConfig,
    TrainSettings,
)

DONE = "DONE.json"


def log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[upcycle run] {message}", file=sys.stderr, flush=True)


def is_done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def mark_done(folder: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / DONE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def read_done(folder: Path) -> dict[str, Any]:
    return json.loads((folder / DONE).read_text())


@dataclass
class Paths:
    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def seed(self) -> Path:
        return self.root / "seed"

    def branch(self, domain: str) -> Path:
        return self.root / "branches" / domain

    def mix(self, name: str) -> Path:
        return self.root / "mix" / name

    def finetune(self, name: str) -> Path:
        return self.root / "finetune" / name

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def routing(self, name: str) -> Path:
        return self.root / "routing" / name

    @property
    def report(self) -> Path:
        return self.root / "report"


def visible_gpus(wanted: list[int] | None = None) -> list[int]:
    """Indices of the CUDA GPUs this process sees (`wanted` restricts them); [] without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wanted is None:
        return list(range(count))
    if len(set(wanted)) != len(wanted):
        raise UpcycleError("branches.gpus lists a GPU twice; list each index once")
    missing = [g for g in wanted if not 0 <= g < count]
    if missing:
        raise UpcycleError(
            f"branches.gpus names GPU {missing[0]}, but this machine shows {count} GPU(s); "
            "list indices it has, or remove branches.gpus"
        )
    return list(wanted)


@dataclass(frozen=True)
class BranchLaunchPlan:
    """GPU groups (one branch each at a time; an empty tuple is a CPU slot) and CPU threads per
    branch process."""

    groups: tuple[tuple[int, ...], ...]
    threads: int

    def describe(self, group: tuple[int, ...]) -> str:
        return f"GPU {','.join(map(str, group))}: " if group else ""


def plan_branch_launches(
    branches: int, gpus: list[int], gpus_per_branch: int, max_parallel: int | None
) -> BranchLaunchPlan:
    """How `launch: parallel` places branches: consecutive groups of `gpus_per_branch` GPUs, as
    many at once as there are groups (capped by `max_parallel`); without GPUs, `max_parallel`
    (default 2) CPU processes, the machine's threads split between them."""
    if gpus:
        if gpus_per_branch > len(gpus):
            raise UpcycleError(
                f"branches.gpus_per_branch is {gpus_per_branch} but only {len(gpus)} GPU(s) are available; "
                f"set it to at most {len(gpus)}"
            )
        groups = [
            tuple(gpus[i : i + gpus_per_branch])
            for i in range(0, len(gpus) - gpus_per_branch + 1, gpus_per_branch)
        ]
        slots = max(1, min(len(groups), branches, max_parallel or len(groups)))
        threads = max(1, (os.cpu_count() or 1) // (slots * gpus_per_branch))  # per process
        return BranchLaunchPlan(tuple(groups[:slots]), threads)
    slots = max(1, min(max_parallel or 2, branches))
    return BranchLaunchPlan(tuple(() for _ in range(slots)), max(1, (os.cpu_count() or 1) // slots))


def branch_command(
    path: Path, group: tuple[int, ...], threads: int, parent_visible: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command and extra environment of one branch process: `upcycle train` on its GPU, or
    under torchrun (standalone rendezvous on a free port, FSDP2) on a group of several.

    `group` holds indices among the GPUs this process sees; `parent_visible` is this process's
    CUDA_VISIBLE_DEVICES, through which they are mapped (a child given "0" under a parent that
    sees "4,5" must get "4")."""
    env = {"OMP_NUM_THREADS": str(threads)}
    train = ["-m", "upcycle", "train", str(path), "--resume"]
    if not group:
        return [sys.executable, *train], env
    entries = [e.strip() for e in (parent_visible or "").split(",") if e.strip()]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(entries[g] if entries else str(g) for g in group)
    if len(group) == 1:
        return [sys.executable, *train], env
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={len(group)}",
    ]
    return [*torchrun, *train], env


def train_config(
    settings: TrainSettings,
    *,
    model: dict[str, Any],
    data: Path,
    seq_len: int,
    output: Path,
    stop: dict[str, Any],
    weights: dict[str, float] | None,
    seed: int,
) -> dict[str, Any]:
    """The TrainConfig (as a dict) of one pipeline training stage."""
    config: dict[str, Any] = {
        "model": model,
        "data": {"path": str(data), "seq_len": seq_len, **({"weights": weights} if weights else {})},
        "batch": {
            "global_batch_size": settings.global_batch_size,
            **({"micro_batch_size": settings.micro_batch_size} if settings.micro_batch_size else {}),
        },
        "stop": stop,
        "output": str(output),
        "optimizer": {"lr": settings.lr, "weight_decay": settings.weight_decay},
        "schedule": {"warmup_steps": settings.warmup_steps, "min_lr_ratio": settings.min_lr_ratio},
        "clip_grad_norm": settings.clip_grad_norm,
        "precision": settings.precision,
        "compile": settings.compile,
        "seed": seed,
        "checkpoint": {"every_steps": settings.checkpoint_every_steps},
        "eval": {"at_end": False},  # the pipeline's own evaluation stage scores every model once
        "log": {"progress": False},
    }
    for key, value in settings.extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def run_training(config: dict[str, Any], folder: Path, quiet: bool) -> dict[str, Any]:
    """Train (resuming from the stage's last checkpoint) and mark the stage done."""
    from upcycle.train import train

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "train.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    result = train(config, resume=True, quiet=quiet)
    record = {"steps": result.steps, "tokens": result.tokens, "flops": result.flops, "eval": result.eval}
    mark_done(folder, record)
    return record


def check_mix(spec: MixSpec, seed: ModelConfig, branches: int) -> None:
    """Refuse an entry of `mixes` whose recipe or parameters are wrong, before anything is trained."""
    from upcycle.conversion import check_convert_config
    from upcycle.recipes import RECIPES

    where, params = f"mixes.{spec.name}", spec.parameters()
    if spec.recipe == "dense":
        if params:
            raise UpcycleError(
                f"{where}: recipe dense (continued training of the seed) takes no parameters; remove "
                f"{', '.join(sorted(params))}"
            )
        return
    if spec.recipe == "btm":
        validated(BTMParams, params, where)
        return
    if spec.recipe not in RECIPES:
        raise UpcycleError(
            f"{where}: unknown recipe {spec.recipe!r}; use one of {', '.join([*sorted(RECIPES), 'dense', 'btm'])}"
        )
    sources = [seed] * (1 if spec.recipe in SEED_STARTED else branches)
    try:
        check_convert_config({"recipe": spec.recipe, **params}, sources, where)
    except UpcycleError as error:
        message = str(error)
        if message.startswith(where):
            raise
        raise UpcycleError(f"{where}: {message}") from error


@dataclass
class Pipeline:
    config: PipelineConfig
    quiet: bool = False
    paths: Paths = field(init=False)

    def __post_init__(self) -> None:
        self.paths = Paths(Path(self.config.output))

    # -- before any stage --------------------------------------------------------------------
    def preflight(self) -> None:
        """Every refusal that needs no trained model, before the first stage writes anything:
        the user's data files and tokenizer, the seed, each training stage's train config (the
        `extra` keys included) and each mix's recipe and parameters, checked against the seed's
        shapes as `upcycle convert` would check them."""
        c = self.config
        id_bound = self._check_data()
        seed = c.seed.config if c.seed.config is not None else load_config(c.seed.path)
        if id_bound is not None and seed.vocab_size < id_bound:
            where = "seed.config" if c.seed.config is not None else f"the seed {c.seed.path}"
            raise UpcycleError(
                f"{where} has vocab_size {seed.vocab_size} but the tokenizer makes ids up to {id_bound - 1}; "
                f"set vocab_size to at least {id_bound} or use a seed with this tokenizer"
            )
        self._check_training(seed)
        for spec in c.mixes:
            check_mix(spec, seed, len(c.branch_domains()))

    def _check_data(self) -> int | None:
        """Refuse missing data files or tokenizer; the bound on token ids the data will hold."""
        c = self.config
        if c.corpus is not None:
            return c.corpus.vocab_size
        if is_done(self.paths.data):
            return None
        from upcycle.data.ingest import resolve_sources
        from upcycle.data.tokenizer import load_tokenizer

        config = self._data_config(c.data.tokenizer, {d: f.model_dump() for d, f in c.data.domains.items()})
        tokenizer = load_tokenizer(config.tokenizer, config.eos_token, need_bos=config.add_bos)
        for name, domain in config.domains.items():
            resolve_sources(name, domain)
        return tokenizer.id_upper_bound

    def _check_training(self, seed: ModelConfig) -> None:
        from upcycle.train.config import TrainConfig
        from upcycle.train.preflight import batch_layout, check_expert_parallel

        c = self.config
        stages = [
            ("branches", c.branches.train, c.branches.steps),
            ("finetune", c.finetune.train, c.finetune.steps),
        ]
        if c.seed.config is not None:
            stages.insert(0, ("seed", c.seed.train, c.seed.steps))
        for stage, settings, steps in stages:
            model = {"config": seed.model_dump(mode="json")} if stage == "seed" else {"path": "seed"}
            config = self._train(settings, model, self.paths.root / stage, {"max_steps": steps}, None)
            train_config = validated(TrainConfig, config, f"{stage}.train")
            world = self._stage_world_size(stage)
            ep = train_config.parallel.expert_parallel
            try:
                batch_layout(train_config.batch, world)
                if stage != "finetune":  # the seed and the branches are the dense seed model
                    check_expert_parallel(ep, seed, world)
                elif world % ep:
                    raise UpcycleError(
                        f"parallel.expert_parallel {ep} does not divide the {world} rank(s) the pipeline "
                        "runs the finetune on; set it to 1 here, or run the finetune yourself under torchrun"
                    )
            except UpcycleError as error:
                raise UpcycleError(f"{stage}.train: {error}") from error

    def _stage_world_size(self, stage: str) -> int:
        """Ranks a stage runs on: a branch on a GPU group of `gpus_per_branch` under
        `launch: parallel` on a GPU machine, one process otherwise."""
        b = self.config.branches
        if stage == "branches" and b.launch == "parallel" and visible_gpus(b.gpus):
            return b.gpus_per_branch
        return 1

    # -- data --------------------------------------------------------------------------------
    def _data_config(self, tokenizer: Path | str, domains: dict[str, Any]):
        from upcycle.data import DataConfig

        c = self.config
        return DataConfig.model_validate(
            {
                "domains": domains,
                "tokenizer": str(tokenizer),
                "heldout": {"fraction": c.heldout_fraction},
                "seed": c.random_seed,
            }
        )

    def prepare(self) -> tuple[Path, Path]:
        """Corpus (built-in) or the user's files -> tokenizer and prepared data."""
        from upcycle.data import prepare_data

        c, p = self.config, self.paths
        if c.corpus is not None:
            from upcycle.corpus import build_corpus, train_tokenizer

            info = build_corpus(
                p.corpus, c.corpus.domains, c.corpus.bytes_per_domain, c.corpus.seed,
                quiet=self.quiet, download=c.corpus.download,
            )  # fmt: skip
            tokenizer = train_tokenizer(
                info, p.corpus / "tokenizer", vocab_size=c.corpus.vocab_size, quiet=True
            )
            domains = {
                d: {"paths": [str(p.corpus / f"{d}.jsonl")], "format": "jsonl"} for d in c.corpus.domains
            }
        else:
            tokenizer = c.data.tokenizer
            domains = {d: files.model_dump() for d, files in c.data.domains.items()}
        if not is_done(p.data):
            prepare_data(self._data_config(tokenizer, domains), p.data, quiet=self.quiet)
            mark_done(p.data, {"tokenizer": str(tokenizer)})
        return Path(tokenizer), p.data

    # -- seed and branches -------------------------------------------------------------------
    def seed_model(self, tokenizer: Path, data: Path) -> Path:
        c, p = self.config, self.paths
        if c.seed.path is not None:
            return Path(c.seed.path)
        final = p.seed / "final"
        if not is_done(p.seed):
            log(f"training the seed for {c.seed.steps} steps", self.quiet)
            model = {
                "config": c.seed.config.model_dump(mode="json"),
                "init_seed": c.random_seed,
                "tokenizer": str(tokenizer),
            }
            stop = {"max_steps": c.seed.steps}
            run_training(self._train(c.seed.train, model, p.seed, stop, None), p.seed, self.quiet)
        return final

    def _train(self, settings, model, output, stop, weights) -> dict[str, Any]:
        c = self.config
        return train_config(
            settings,
            model=model,
            data=self.paths.data,
            seq_len=c.seq_len,
            output=output,
            stop=stop,
            weights=weights,
            seed=c.random_seed,
        )

    def branch_configs(self, seed: Path, tokenizer: Path) -> dict[str, dict[str, Any]]:
        c = self.config
        model = {"path": str(seed), "tokenizer": str(tokenizer)}
        stop = {"max_steps": c.branches.steps}
        return {
            d: self._train(c.branches.train, model, self.paths.branch(d), stop, {d: 1.0})
            for d in c.branch_domains()
        }

    def train_branches(self, seed: Path, tokenizer: Path) -> dict[str, Path] | None:
        """Train every branch; None when they were handed to a scheduler (`launch: print`)."""
        c, p = self.config, self.paths
        configs = {
            d: cfg for d, cfg in self.branch_configs(seed, tokenizer).items() if not self.branch_done(d)
        }
        if configs and c.branches.launch == "print":
            self._print_branch_commands(configs)
            return None
        if configs and c.branches.launch == "parallel":
            self._train_branches_in_parallel(configs)
        for domain, config in configs.items():
            if not self.branch_done(domain):
                log(f"training branch {domain} for {c.branches.steps} steps", self.quiet)
                run_training(config, p.branch(domain), self.quiet)
        return {d: p.branch(d) / "final" for d in c.branch_domains()}

    def branch_done(self, domain: str) -> bool:
        """Done here, or trained elsewhere (a scheduler ran the printed command): the trainer
        writes `final/` only when a run completes."""
        folder = self.paths.branch(domain)
        return is_done(folder) or (folder / "final" / "config.json").is_file()

    def _write_branch_yaml(self, domain: str, config: dict[str, Any]) -> Path:
        folder = self.paths.branch(domain)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "train.yaml"
        atomic_write_bytes(path, yaml.safe_dump(config, sort_keys=False).encode())
        return path

    def _print_branch_commands(self, configs: dict[str, dict[str, Any]]) -> None:
        print("# Train each branch (any machine that sees this folder; torchrun works too):")
        for domain, config in configs.items():
            path = self._write_branch_yaml(domain, config)
            print(f"upcycle train {shlex.quote(str(path))} --resume")
        print("# then run the pipeline again: it continues from the mixes.")

    def _train_branches_in_parallel(self, configs: dict[str, dict[str, Any]]) -> None:
        """Run branches as separate processes (see `BranchSection`: one GPU group each on a GPU
        machine, else `max_parallel` CPU processes splitting the threads)."""
        b = self.config.branches
        plan = plan_branch_launches(len(configs), visible_gpus(b.gpus), b.gpus_per_branch, b.max_parallel)
        pending = list(configs.items())
        free = list(plan.groups)
        running: list[tuple[str, subprocess.Popen, tuple[int, ...]]] = []
        try:
            while pending or running:
                while pending and free:
                    domain, config = pending.pop(0)
                    group = free.pop(0)
                    path = self._write_branch_yaml(domain, config)
                    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                    command, env = branch_command(path, group, plan.threads, visible)
                    log(f"launching branch {domain}: {plan.describe(group)}{' '.join(command)}", self.quiet)
                    proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
                    running.append((domain, proc, group))
                time.sleep(0.2)
                for domain, proc, group in list(running):
                    if proc.poll() is None:
                        continue
                    running.remove((domain, proc, group))
                    free.append(group)
                    if proc.returncode != 0:
                        raise UpcycleError(
                            f"branch {domain} failed (exit code {proc.returncode}); see "
                            f"{self.paths.branch(domain)} and rerun the pipeline to resume"
                        )
        finally:  # a failure, an error here or Ctrl-C: stop the others; a rerun resumes every branch
            for _, other, _ in running:
                other.terminate()
            for _, other, _ in running:
                other.wait()

    # -- mixes and finetunes -----------------------------------------------------------------
    def branch_flops(self, seed: Path) -> float:
        """FLOPs of all branch training: steps x tokens per step x FLOPs per token, per branch."""
        c = self.config
        per_token = training_flops_per_token(load_config(seed), c.seq_len)
        tokens = c.branches.steps * c.branches.train.global_batch_size * c.seq_len
        return float(per_token) * tokens * len(c.branch_domains())

    def mix(self, spec: MixSpec, seed: Path, branches: dict[str, Path]) -> Path:
        """The starting model of one comparison entry (converted, the seed, or a BTM folder)."""
        import upcycle
        from upcycle.eval import build_btm

        folder = self.paths.mix(spec.name)
        model = folder / "model"
        if spec.recipe == "dense":
            return seed
        if is_done(folder):
            return model
        params = spec.parameters()
        if spec.recipe == "btm":
            build_btm(branches, self.paths.data, model, overwrite=True, **params)
        else:
            sources = [str(branches[d]) for d in self.config.branch_domains()]
            if spec.recipe in SEED_STARTED:
                sources = [str(seed)]
            upcycle.convert({"recipe": spec.recipe, "sources": sources, **params}, model, overwrite=True)
        mark_done(folder, {"recipe": spec.recipe})
        return model

    def finetune_budget(
        self, spec: MixSpec, start: Path, total: float, branch_flops: float
    ) -> dict[str, Any]:
        """Steps for this model's finetune. Compute-matched budgets become the nearest whole
        number of steps (stopping when a budget is reached would always overshoot it)."""
        c = self.config
        if c.finetune.budget == "steps_matched":
            return {"max_steps": c.finetune.steps}
        budget = total - branch_flops if spec.recipe in BRANCH_STARTED else total
        tokens_per_step = c.finetune.train.global_batch_size * c.seq_len
        per_step = float(training_flops_per_token(load_config(start), c.seq_len)) * tokens_per_step
        return {"max_steps": max(1, round(budget / per_step))}

    def reference_total_flops(self, branch_flops: float, starts: dict[str, Path]) -> float:
        reference = self.config.reference_mix()
        if reference is None:
            return 0.0
        per_token = training_flops_per_token(load_config(starts[reference.name]), self.config.seq_len)
        tokens = (
            self.config.finetune.steps * self.config.finetune.train.global_batch_size * self.config.seq_len
        )
        return branch_flops + float(per_token) * tokens

    def finetune(self, spec: MixSpec, start: Path, tokenizer: Path, budget: dict[str, Any]) -> Path:
        folder = self.paths.finetune(spec.name)
        if not is_done(folder):
            log(f"finetuning {spec.name} ({spec.recipe}) with {budget}", self.quiet)
            model = {"path": str(start), "tokenizer": str(tokenizer)}
            run_training(
                self._train(self.config.finetune.train, model, folder, budget, None), folder, self.quiet
            )
        return folder / "final"

    # -- evaluation and report ---------------------------------------------------------------
    def evaluate(self, models: dict[str, Path]) -> Path:
        from upcycle.eval import evaluate_perplexity, write_perplexity_report

        folder = self.paths.eval
        if not is_done(folder):
            log(f"evaluating {len(models)} models per domain", self.quiet)
            e = self.config.eval
            report = evaluate_perplexity(
                {name: str(path) for name, path in models.items()},
                self.paths.data,
                seq_len=self.config.seq_len,
                batch_size=e.batch_size,
                max_sequences=e.max_sequences,
            )
            write_perplexity_report(report, folder)
            mark_done(folder, {"models": {k: str(v) for k, v in models.items()}})
        return folder / "eval.json"

    def routing(self, name: str, model: Path) -> Path:
        from upcycle.eval import analyze_routing, write_routing_report

        folder = self.paths.routing(name)
        if not is_done(folder):
            e = self.config.eval
            report = analyze_routing(
                model, self.paths.data, seq_len=self.config.seq_len, batch_size=e.batch_size,
                max_sequences=e.max_sequences,
            )  # fmt: skip
            report.model = name  # figures and the report are titled by the comparison's name
            write_routing_report(report, folder)
            mark_done(folder, {"model": str(model)})
        return folder / "routing.json"

    def run(self) -> Path | None:
        """Run every stage not yet done; the report's path, or None when branches were printed."""
        self.preflight()
        tokenizer, data = self.prepare()
        seed = self.seed_model(tokenizer, data)
        branches = self.train_branches(seed, tokenizer)
        if branches is None:
            return None
        starts = {spec.name: self.mix(spec, seed, branches) for spec in self.config.mixes}
        branch_flops = self.branch_flops(seed)
        total = self.reference_total_flops(branch_flops, starts)
        models: dict[str, Path] = {"seed": seed, **{f"branch-{d}": p for d, p in branches.items()}}
        finals: dict[str, Path] = {}
        for spec in self.config.mixes:
            if spec.recipe == "btm":
                models[spec.name] = starts[spec.name]
                continue
            budget = self.finetune_budget(spec, starts[spec.name], total, branch_flops)
            finals[spec.name] = self.finetune(spec, starts[spec.name], tokenizer, budget)
            models[spec.name] = finals[spec.name]
        eval_json = self.evaluate(models)
        routing_files = [
            self.routing(name, path) for name, path in finals.items() if load_config(path).moe is not None
        ]
        loss_files = [self.paths.finetune(name) / "metrics.jsonl" for name in finals]
        from upcycle.eval import build_report

        report = build_report(
            self.paths.report,
            eval_files=[eval_json],
            routing_files=routing_files,
            loss_files=[p for p in loss_files if p.is_file()],
            title=f"upcycle pipeline: {Path(self.config.output).name}",
        )
        self._write_summary(models, branch_flops, total)
        return report

    def _write_summary(self, models: dict[str, Path], branch_flops: float, total: float) -> None:
        flops = {}
        for name in models:
            folder = self.paths.finetune(name)
            if is_done(folder):
                flops[name] = read_done(folder)["flops"]
        summary = {
            "convention": "compute_matched: seed pre-training not counted; branched models spend "
            "branch FLOPs + finetune FLOPs; seed-started models spend the same total on the mixture",
            "branch_flops": branch_flops,
            "total_flops_per_model": total,
            "finetune_flops": flops,
        }
        atomic_write_bytes(self.paths.root / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())


def run_pipeline(config: PipelineConfig | dict | str | Path, *, quiet: bool = False) -> Path | None:
    from upcycle.errors import validated
    from upcycle.yaml_config import load_yaml_model

    if isinstance(config, dict):
        config = validated(PipelineConfig, config, "pipeline config")
    elif not isinstance(config, PipelineConfig):
        config = load_yaml_model(config, PipelineConfig)
    return Pipeline(config, quiet=quiet).run()
