"""What a run reports: JSONL records, TensorBoard scalars (when installed), a progress bar.

One JSON object per line in OUTPUT/metrics.jsonl, written by rank 0 only:

- `{"kind": "train", "step", "loss", "lm_loss", "aux_losses": {kind: value}, "lr", "grad_norm",
  "tokens", "flops", "tokens_per_s", "mfu", "mfu_datasheet", "expert_load": {layer: [share per
  expert]}, "skipped"}`. `loss` is what was differentiated (lm_loss + every aux loss); each aux
  kind is summed over layers. `tokens_per_s` is over all ranks, timed from the start of the
  step to its host synchronisation (data reading included, evaluation and checkpoints not).
  `mfu` is model FLOPs utilisation against 790 TFLOP/s per GPU (the bf16 matmul ceiling
  measured on an H100, ../shared/perf.md), `mfu_datasheet` against the 989 TFLOP/s datasheet
  figure; both are null on CPU and in fp32, where those ceilings do not apply.
  `expert_load`: for each MoE layer, the share of the step's token-to-expert assignments that
  each expert received (1/E each when balanced), rounded to 4 digits.
- `{"kind": "eval", "step", "domains": {name: {"loss", "perplexity", "tokens"}}}`.

Non-finite numbers are written as null (strict JSON); such a step also has `skipped: true` or
ends the run. On resume, records after the resumed step are dropped first, so the file reads
as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from upcycle.checkpoint.atomic import atomic_write_bytes
from upcycle.errors import UpcycleError
from upcycle.train.step import StepResult

H100_BF16_MEASURED_FLOPS = 790e12
H100_BF16_DATASHEET_FLOPS = 989e12


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def expert_shares(expert_load: dict[int, list[int]]) -> dict[str, list[float]]:
    return {
        str(layer): [round(count / max(1, sum(counts)), 4) for count in counts]
        for layer, counts in expert_load.items()
    }


def train_record(
    result: StepResult,
    *,
    tokens: int,
    flops: float,
    tokens_per_s: float,
    flops_per_token: int,
    world_size: int,
    gpu_bf16: bool,
) -> dict[str, Any]:
    def mfu(peak: float) -> float | None:
        return tokens_per_s * flops_per_token / (peak * world_size) if gpu_bf16 else None

    return _finite_or_none(
        {
            "kind": "train",
            "step": result.step,
            "loss": result.loss,
            "lm_loss": result.lm_loss,
            "aux_losses": result.aux_losses,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens": tokens,
            "flops": flops,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(H100_BF16_MEASURED_FLOPS),
            "mfu_datasheet": mfu(H100_BF16_DATASHEET_FLOPS),
            "expert_load": expert_shares(result.expert_load),
            "skipped": result.skipped,
        }
    )


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a truncated last line (a run killed mid-write) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UpcycleError(f"{path} line {number} is not JSON; repair or remove the file") from None
    return records


class MetricsWriter:
    """Appends records to the JSONL file and, when available, TensorBoard; inert off rank 0."""

    def __init__(self, path: Path, tensorboard_dir: Path | None, enabled: bool) -> None:
        self.path, self.enabled = Path(path), enabled
        self.evaluated_steps: set[int] = set()  # steps of the eval records kept by `start`
        self._file = None
        self._tensorboard = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only, as documented
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tensorboard = SummaryWriter(str(tensorboard_dir))

    def start(self, resume_step: int) -> None:
        """Open the file, keeping only the records of steps ≤ `resume_step` (0: a fresh file)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        self.evaluated_steps = {r["step"] for r in kept if r.get("kind") == "eval"}
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        step, prefix = record["step"], record["kind"]
        flat: dict[str, Any] = {}
        if prefix == "train":
            flat = {k: record[k] for k in ("loss", "lm_loss", "lr", "grad_norm", "tokens_per_s", "mfu")}
            flat.update({f"aux/{k}": v for k, v in record["aux_losses"].items()})
        else:
            for domain, values in record["domains"].items():
                flat.update({f"{domain}/{k}": v for k, v in values.items() if k != "tokens"})
        for name, value in flat.items():
            if isinstance(value, float | int):
                self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()


class TrainProgress:
    """A progress bar on stderr with step, loss, tokens/s and ETA; off when stderr is not a
    terminal, on ranks other than 0, or when disabled."""

    def __init__(self, total_steps: int, first_step: int, enabled: bool) -> None:
        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled or not console.is_terminal,
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=first_step, loss="-", rate="-"
        )

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def update(self, result: StepResult, tokens_per_s: float) -> None:
        self._progress.update(
            self._task, completed=result.step, loss=f"{result.loss:.4f}", rate=f"{tokens_per_s:,.0f}"
        )
