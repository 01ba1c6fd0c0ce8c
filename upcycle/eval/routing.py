"""Where each domain's tokens go: per-layer routing statistics of an MoE or BAM model.

The held-out windows of each domain (`HeldoutBatches`, the same tokens `upcycle eval` scores)
are run through the model while hooks read every router's decision:

- FFN MoE layers (a forward hook on `mlp.gate`, which returns a `Routing`):
  `assignments[d][e]`: how many of domain d's top-k assignments chose expert e (before any
  capacity drop: what the router asked for); `assignment_share[d][e]` = that / (tokens·k), so a
  row sums to 1; `mean_probability[d][e]`: the mean softmax(router logits) probability.
- Attention-expert (MoA) layers (BAM; `self_attn.route` is wrapped for the run): `mean_gate[d][e]`,
  the mean gate weight the router gave expert e over domain d's tokens (rows sum to 1 for soft
  routing).
- Both: `entropy[d]`, the mean over tokens of the entropy (nats) of softmax(router logits), with
  `max_entropy` = ln E for reference (uniform routing); `dead_experts`, the experts that no token
  of any domain chose (FFN: no assignment; MoA: no non-zero gate); `load_imbalance`, max/mean of
  the per-expert load pooled over domains (assignments for FFN, gate mass for MoA): 1 is
  perfectly balanced, E means one expert takes everything.

For soft FFN routing every token is assigned to every expert, so its heatmap shows the mean
probability instead of the (uniform) assignment share. sample_top1 routing draws a Gumbel sample
even in eval mode, so its statistics vary slightly between runs.

Shape letters: B batch, S sequence, T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upcycle.data import HeldoutBatches, Manifest, load_manifest
from upcycle.errors import UpcycleError
from upcycle.eval.markdown import markdown_table
from upcycle.eval.models import default_dtype, device_of, forward_precision, load_evaluable, resolve_device
from upcycle.eval.progress import EvalProgress
from upcycle.model.moa import MixtureOfAttention
from upcycle.model.moe import MoE
from upcycle.model.router import Routing

REPORT_KIND = "upcycle-routing"


@dataclass
class Tally:
    """Running sums for one router and one domain (tensors stay on the model's device)."""

    chosen_E: torch.Tensor  # FFN: assignments; MoA: tokens with a non-zero gate
    weight_E: torch.Tensor  # FFN: summed probabilities; MoA: summed gates
    entropy: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, num_experts: int, device: torch.device) -> Tally:
        return cls(
            torch.zeros(num_experts, dtype=torch.int64, device=device),
            torch.zeros(num_experts, dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.float64, device=device),
        )

    def add(self, chosen_TE: torch.Tensor, weight_TE: torch.Tensor, logits_TE: torch.Tensor) -> None:
        self.chosen_E += chosen_TE.sum(0)
        self.weight_E += weight_TE.to(torch.float64).sum(0)
        probs_TE = torch.softmax(logits_TE.to(torch.float64), dim=-1)
        self.entropy += torch.special.entr(probs_TE).sum()
        self.tokens += logits_TE.shape[0]


@dataclass
class RouterInfo:
    kind: str  # "ffn" or "attention"
    layer: int
    routing: str
    num_experts: int
    top_k: int
    tallies: dict[str, Tally] = field(default_factory=dict)


class RoutingRecorder:
    """Context manager: while active, every router call adds to the tallies of `self.domain`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.domain: str | None = None
        self.routers: list[RouterInfo] = []
        self._undo: list = []
        for index, layer in enumerate(getattr(getattr(model, "model", None), "layers", [])):
            if isinstance(layer.self_attn, MixtureOfAttention):
                attention = layer.self_attn
                top_k = attention.router.top_k if attention.routing == "topk" else attention.num_experts
                info = RouterInfo("attention", index, attention.routing, attention.num_experts, top_k)
                self.routers.append(info)
                self._wrap_route(attention, info)
            if isinstance(layer.mlp, MoE):
                moe = layer.mlp
                info = RouterInfo("ffn", index, moe.gate.routing, moe.num_experts, moe.top_k)
                self.routers.append(info)
                self._undo.append(moe.gate.register_forward_hook(self._ffn_hook(info)).remove)
        if not self.routers:
            raise UpcycleError(
                "this model has no router (no MoE or attention-expert layer); analyse an MoE or BAM checkpoint"
            )

    def _tally(self, info: RouterInfo, device: torch.device) -> Tally:
        if self.domain is None:
            raise RuntimeError("set RoutingRecorder.domain before running the model")
        if self.domain not in info.tallies:
            info.tallies[self.domain] = Tally.zeros(info.num_experts, device)
        return info.tallies[self.domain]

    def _ffn_hook(self, info: RouterInfo):
        def hook(module: nn.Module, inputs: tuple, routing: Routing) -> None:
            logits_TE = routing.logits_TE.detach()
            chosen_TE = torch.zeros_like(logits_TE, dtype=torch.int64)
            chosen_TE.scatter_add_(1, routing.indices_TK, torch.ones_like(routing.indices_TK))
            self._tally(info, logits_TE.device).add(chosen_TE, routing.probs_TE.detach(), logits_TE)

        return hook

    def _wrap_route(self, attention: MixtureOfAttention, info: RouterInfo) -> None:
        route = attention.route  # the bound method; an instance attribute shadows it for the run

        def recording_route(u_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            gate_BSE, logits_BSE = route(u_BSD)
            gate_TE, logits_TE = gate_BSE.detach().flatten(0, 1), logits_BSE.detach().flatten(0, 1)
            self._tally(info, gate_TE.device).add((gate_TE > 0).long(), gate_TE, logits_TE)
            return gate_BSE, logits_BSE

        attention.route = recording_route
        self._undo.append(lambda: delattr(attention, "route"))

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc_info) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


@dataclass
class RoutingReport:
    model: str
    data: str
    seq_len: int
    max_sequences: int | None
    domains: list[str]
    tokens: dict[str, int]
    layers: list[dict[str, Any]]  # one record per router, see the module docstring
    images: dict[str, str] = field(default_factory=dict)  # kind -> PNG file name beside the JSON

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": REPORT_KIND,
            "model": self.model,
            "data": self.data,
            "seq_len": self.seq_len,
            "max_sequences": self.max_sequences,
            "domains": self.domains,
            "tokens": self.tokens,
            "images": self.images,
            "routers": self.layers,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoutingReport:
        if data.get("kind") != REPORT_KIND:
            raise UpcycleError(f"this JSON is not a routing report (kind {data.get('kind')!r})")
        return cls(
            data["model"],
            data["data"],
            data["seq_len"],
            data["max_sequences"],
            data["domains"],
            data["tokens"],
            data["routers"],
            data.get("images", {}),
        )

    def routers(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.layers if r["kind"] == kind]

    def markdown(self) -> str:
        """One row per router: entropy (and its maximum), dead experts, load imbalance."""
        rows = [
            [
                r["layer"],
                "FFN" if r["kind"] == "ffn" else "attention",
                f"{r['routing']} (k={r['top_k']}/{r['num_experts']})",
                f"{r['entropy_all']:.3f} / {r['max_entropy']:.3f}",
                ", ".join(map(str, r["dead_experts"])) or "none",
                f"{r['load_imbalance']:.2f}",
            ]
            for r in self.layers
        ]
        headers = ["layer", "router", "routing", "entropy / max (nats)", "dead experts", "load max/mean"]
        return markdown_table(headers, rows, align_right_from=3) + "\n"

    def heatmap_panels(self, kind: str) -> list[tuple[str, list[list[float]]]]:
        """(panel title, domains × experts values) per router of `kind`, for the heatmap PNG."""
        panels = []
        for r in self.routers(kind):
            if kind == "attention":
                key, what = "mean_gate", "mean gate"
            elif r["routing"] == "soft":
                key, what = "mean_probability", "mean probability"
            else:
                key, what = "assignment_share", "share of assignments"
            panels.append((f"layer {r['layer']}: {what}", [r[key][d] for d in self.domains]))
        return panels


def analyze_routing(
    model: nn.Module | str | Path,
    manifest: Manifest | str | Path,
    *,
    domains: Sequence[str] | None = None,
    seq_len: int = 512,
    batch_size: int = 4,
    max_sequences: int | None = None,
    device: str | torch.device | None = "auto",
    precision: str = "auto",
    quiet: bool = True,
) -> RoutingReport:
    """Routing statistics of `model` (a folder, or a loaded `Transformer`) on each domain."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    chosen = sorted(domains) if domains else sorted(manifest.domains)
    for d in chosen:
        manifest.split(d, "heldout")  # refuses an unknown domain by name
    batches = {
        d: HeldoutBatches(manifest, d, seq_len, batch_size, max_sequences=max_sequences) for d in chosen
    }
    name = str(model) if isinstance(model, str | Path) else type(model).__name__
    if isinstance(model, str | Path):
        target = resolve_device(device)
        model = load_evaluable(model, device=target, dtype=default_dtype(target, precision))
    run_device = device_of(model)
    model.eval()
    with RoutingRecorder(model) as recorder, EvalProgress(quiet) as progress:
        progress.start(f"routing {name}", sum(b.num_predicted_tokens for b in batches.values()))
        with forward_precision(run_device, precision):
            for domain, domain_batches in batches.items():
                recorder.domain = domain
                for batch in domain_batches:
                    model(batch.input_ids_BS.to(run_device))
                    progress.advance(batch.labels_BS.numel())
    return RoutingReport(
        model=name,
        data=str(manifest.root),
        seq_len=seq_len,
        max_sequences=max_sequences,
        domains=chosen,
        tokens={d: b.num_predicted_tokens for d, b in batches.items()},
        layers=[summarize(info, chosen) for info in recorder.routers],
    )


def summarize(info: RouterInfo, domains: Sequence[str]) -> dict[str, Any]:
    """The JSON record of one router (see the module docstring for every key)."""
    tallies = {d: info.tallies[d] for d in domains}
    chosen = {d: t.chosen_E.cpu().tolist() for d, t in tallies.items()}
    weight = {d: (t.weight_E / t.tokens).cpu().tolist() for d, t in tallies.items()}
    pooled_chosen = [sum(chosen[d][e] for d in domains) for e in range(info.num_experts)]
    pooled_tokens = sum(t.tokens for t in tallies.values())
    record: dict[str, Any] = {
        "kind": info.kind,
        "layer": info.layer,
        "routing": info.routing,
        "num_experts": info.num_experts,
        "top_k": info.top_k,
        "entropy": {d: float(t.entropy) / t.tokens for d, t in tallies.items()},
        "entropy_all": float(sum(t.entropy for t in tallies.values())) / pooled_tokens,
        "max_entropy": math.log(info.num_experts),
        "dead_experts": [e for e, n in enumerate(pooled_chosen) if n == 0],
    }
    if info.kind == "ffn":
        record["assignments"] = chosen
        record["assignment_share"] = {d: [n / sum(chosen[d]) for n in chosen[d]] for d in domains}
        record["mean_probability"] = weight
        load = pooled_chosen
    else:
        record["mean_gate"] = weight
        load = [sum(float(tallies[d].weight_E[e]) for d in domains) for e in range(info.num_experts)]
    record["load_imbalance"] = max(load) / (sum(load) / len(load)) if sum(load) > 0 else float("nan")
    return record


def write_routing_report(report: RoutingReport, out_dir: str | Path) -> list[Path]:
    """`routing.json`, `routing.md` and one heatmap PNG per router kind present, in `out_dir`."""
    from upcycle.checkpoint.atomic import atomic_write_bytes
    from upcycle.eval.plots import plot_routing_heatmaps

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, label in (("ffn", "FFN experts"), ("attention", "attention experts")):
        panels = report.heatmap_panels(kind)
        if panels:
            png = out / f"routing_{kind}.png"
            plot_routing_heatmaps(panels, report.domains, png, f"{Path(report.model).name}: {label}")
            report.images[kind] = png.name
            written.append(png)
    json_path, md_path = out / "routing.json", out / "routing.md"
    atomic_write_bytes(json_path, (json.dumps(report.to_json(), indent=2) + "\n").encode())
    atomic_write_bytes(md_path, report.markdown().encode())
    return [json_path, md_path, *written]


def read_routing_report(path: str | Path) -> RoutingReport:
    try:
        return RoutingReport.from_json(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UpcycleError) as error:
        raise UpcycleError(
            f"cannot read {path} as a routing report ({error}); give a routing.json from `upcycle analyze routing`"
        ) from None
