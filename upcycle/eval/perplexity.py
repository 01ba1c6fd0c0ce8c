"""Per-domain held-out perplexity of several models, on exactly the same tokens.

    perplexity(model, domain) = exp( Σ_t −log p(x_{t+1} | x_≤t) / N_domain )

summed over every label position of the domain's held-out windows (`HeldoutBatches`: windows of
seq_len + 1 tokens cut in file order, identical on every pass), so it is token-weighted: a long
document counts more than a short one. The `all` column pools the NLL and the tokens of every
domain (token-weighted across domains too), not the mean of the domain perplexities.

Every model sees the same windows: they are read from the same manifest with the same seq_len
and max_sequences, and the report records, per domain, the number of tokens and a sha256 of the
window tokens, so two reports can be checked to have scored the same text.

Models are given as folders (native, HF dense, HF MoE or BTM; loaded one at a time, so memory
holds one model) or as modules (any evaluable model, see `upcycle.eval.models`). Folders are
checked against the data (vocabulary, tokenizer) before the first model is loaded.

Shape letters: B batch, S sequence (seq_len), V vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from upcycle.data import HeldoutBatches, Manifest, load_manifest
from upcycle.errors import UpcycleError
from upcycle.eval.markdown import markdown_table
from upcycle.eval.models import (
    Evaluable,
    ModelSpec,
    check_against_data,
    default_dtype,
    device_of,
    forward_precision,
    load_evaluable,
    model_names,
    resolve_device,
    vocab_size_of,
)
from upcycle.eval.progress import EvalProgress

REPORT_KIND = "upcycle-perplexity"


@dataclass
class DomainScore:
    """Summed negative log-likelihood (nats) over `tokens` predicted tokens."""

    nll_sum: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    def to_json(self) -> dict[str, float | int]:
        return {
            "perplexity": self.perplexity,
            "mean_nll": self.mean_nll,
            "nll_sum": self.nll_sum,
            "tokens": self.tokens,
        }


@dataclass
class DomainTokens:
    """What was scored in one domain: windows, predicted tokens, sha256 of the window tokens."""

    sequences: int
    tokens: int
    sha256: str


@dataclass
class PerplexityReport:
    data: str
    data_fingerprint: str
    seq_len: int
    max_sequences: int | None
    domains: dict[str, DomainTokens]
    scores: dict[str, dict[str, DomainScore]]  # model name -> domain -> score
    sources: dict[str, str | None] = field(default_factory=dict)  # model name -> folder (None: a module)
    device: str = "cpu"
    precision: str = "fp32"

    def overall(self, model: str) -> DomainScore:
        """Pooled over domains: summed NLL over summed tokens."""
        scores = self.scores[model].values()
        return DomainScore(sum(s.nll_sum for s in scores), sum(s.tokens for s in scores))

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": REPORT_KIND,
            "data": self.data,
            "data_fingerprint": self.data_fingerprint,
            "seq_len": self.seq_len,
            "max_sequences": self.max_sequences,
            "device": self.device,
            "precision": self.precision,
            "domains": {name: asdict(tokens) for name, tokens in self.domains.items()},
            "models": {
                name: {
                    "source": self.sources.get(name),
                    "domains": {domain: score.to_json() for domain, score in per_domain.items()},
                    "all": self.overall(name).to_json(),
                }
                for name, per_domain in self.scores.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PerplexityReport:
        if data.get("kind") != REPORT_KIND:
            raise UpcycleError(f"this JSON is not a perplexity report (kind {data.get('kind')!r})")
        return cls(
            data=data["data"],
            data_fingerprint=data["data_fingerprint"],
            seq_len=data["seq_len"],
            max_sequences=data["max_sequences"],
            domains={name: DomainTokens(**tokens) for name, tokens in data["domains"].items()},
            scores={
                name: {
                    domain: DomainScore(score["nll_sum"], score["tokens"])
                    for domain, score in model["domains"].items()
                }
                for name, model in data["models"].items()
            },
            sources={name: model.get("source") for name, model in data["models"].items()},
            device=data.get("device", "cpu"),
            precision=data.get("precision", "fp32"),
        )

    def markdown(self) -> str:
        """Rows: models; columns: domains and `all`; cells: perplexity (lower is better)."""
        domains = list(self.domains)
        rows = [
            [
                name,
                *(f"{per_domain[d].perplexity:.3f}" for d in domains),
                f"{self.overall(name).perplexity:.3f}",
            ]
            for name, per_domain in self.scores.items()
        ]
        tokens = ["tokens", *(f"{self.domains[d].tokens:,}" for d in domains)]
        tokens.append(f"{sum(t.tokens for t in self.domains.values()):,}")
        table = markdown_table(["model", *domains, "all"], [*rows, tokens], align_right_from=1)
        return (
            f"Held-out perplexity (lower is better), seq_len {self.seq_len}, token-weighted; "
            f"`all` pools every domain's tokens.\n\n{table}\n"
        )


def evaluate_perplexity(
    models: Sequence[ModelSpec] | Mapping[str, ModelSpec],
    manifest: Manifest | str | Path,
    *,
    domains: Sequence[str] | None = None,
    seq_len: int = 512,
    batch_size: int = 4,
    max_sequences: int | None = None,
    device: str | torch.device | None = "auto",
    precision: str = "auto",
    dtype: torch.dtype | None = None,
    check_tokenizer: bool = True,
    quiet: bool = True,
) -> PerplexityReport:
    """Per-domain held-out perplexity of each model; see the module docstring.

    `models`: folders or evaluable modules, as a list (named after their folders) or a mapping
    name -> model. Modules are used where they are (device and dtype untouched); folders are
    loaded onto `device` (`auto`: CUDA if available) in `dtype` (default: fp32 on CPU, the
    checkpoint's dtype on CUDA), evaluated and freed before the next one is loaded.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise UpcycleError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    named = model_names(models)
    if not named:
        raise UpcycleError("no model to evaluate; give at least one checkpoint folder")
    chosen = _choose_domains(manifest, domains)
    batches = {
        d: HeldoutBatches(manifest, d, seq_len, batch_size, max_sequences=max_sequences) for d in chosen
    }
    for spec in named.values():
        if isinstance(spec, str | Path):
            check_against_data(spec, manifest, check_tokenizer)
        elif vocab_size_of(spec) < manifest.tokenizer.id_upper_bound:
            raise UpcycleError(
                f"a model has {vocab_size_of(spec)} vocabulary ids but the data uses ids up to "
                f"{manifest.tokenizer.id_upper_bound - 1}; prepare the data with the model's tokenizer"
            )
    target = resolve_device(device)
    report = PerplexityReport(
        data=str(manifest.root),
        data_fingerprint=manifest.fingerprint,
        seq_len=seq_len,
        max_sequences=max_sequences,
        domains={d: _domain_tokens(b, seq_len) for d, b in batches.items()},
        scores={},
        device=str(target),
        precision=_precision_name(target, precision),
    )
    total_tokens = sum(t.tokens for t in report.domains.values())
    with EvalProgress(quiet) as progress:
        for name, spec in named.items():
            progress.start(name, total_tokens)
            if isinstance(spec, str | Path):
                model = load_evaluable(spec, device=target, dtype=dtype or default_dtype(target, precision))
                report.sources[name] = str(spec)
            else:
                model, report.sources[name] = spec, None
            report.scores[name] = {
                d: score_domain(model, b, precision, progress.advance) for d, b in batches.items()
            }
            del model
    return report


def score_domain(
    model: Evaluable, batches: HeldoutBatches, precision: str = "auto", on_batch=None
) -> DomainScore:
    """Summed NLL of `model` over every label of `batches`, in fp32."""
    device = device_of(model)
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    try:
        with forward_precision(device, precision):
            for batch in batches:
                input_ids_BS = batch.input_ids_BS.to(device)
                labels_BS = batch.labels_BS.to(device)
                logits_BSV = model(input_ids_BS).logits.float()
                nll = F.cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten(), reduction="sum")
                nll_sum += float(nll)
                tokens += labels_BS.numel()
                if on_batch is not None:
                    on_batch(labels_BS.numel())
    finally:
        model.train(was_training)
    return DomainScore(nll_sum, tokens)


def write_perplexity_report(report: PerplexityReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `eval.json` and `eval.md` into `out_dir` (each file atomically); return their paths."""
    from upcycle.checkpoint.atomic import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    atomic_write_bytes(json_path, (json.dumps(report.to_json(), indent=2) + "\n").encode())
    atomic_write_bytes(md_path, report.markdown().encode())
    return json_path, md_path


def read_perplexity_report(path: str | Path) -> PerplexityReport:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UpcycleError(
            f"cannot read {path} ({error}); give an eval.json written by `upcycle eval`"
        ) from None
    try:
        return PerplexityReport.from_json(data)
    except (KeyError, TypeError, UpcycleError) as error:
        raise UpcycleError(f"{path} is not an eval.json written by `upcycle eval` ({error})") from None


def _choose_domains(manifest: Manifest, domains: Sequence[str] | None) -> list[str]:
    if not domains:
        return sorted(manifest.domains)
    unknown = [d for d in domains if d not in manifest.domains]
    if unknown:
        raise UpcycleError(
            f"domain {unknown[0]!r} is not in the data at {manifest.root} (it has: "
            f"{', '.join(sorted(manifest.domains))}); use one of those names"
        )
    return list(dict.fromkeys(domains))


def _domain_tokens(batches: HeldoutBatches, seq_len: int) -> DomainTokens:
    """Count and hash the windows (S + 1 tokens each, as int64), independently of batch size."""
    digest = hashlib.sha256()
    for batch in batches:
        for input_ids_S, labels_S in zip(batch.input_ids_BS, batch.labels_BS, strict=True):
            window = np.concatenate([input_ids_S.numpy(), labels_S[-1:].numpy()]).astype("<i8")
            digest.update(window.tobytes())
    return DomainTokens(batches.num_sequences, batches.num_sequences * seq_len, digest.hexdigest())


def _precision_name(device: torch.device, precision: str) -> str:
    if precision == "auto":
        return "bf16-autocast" if device.type == "cuda" else "fp32"
    return "bf16-autocast" if precision == "bf16" else "fp32"
