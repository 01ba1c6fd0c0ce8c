"""BTM, Branch-Train-Merge's ensemble (methods.md §3.3, §9.12): separate domain expert LMs whose
*output distributions* are mixed by a tf-idf domain router over the context.

    p(x_{s+1} | x_≤s) = Σ_n w_n(x_≤s) · p_n(x_{s+1} | x_≤s)

- Router: the cosine similarity between the tf-idf vector of the context and each domain's mean
  tf-idf vector (`upcycle.eval.tfidf`), the top-k domains kept, and
  w = softmax(similarity_topk / τ) over those k (τ = 0.1 by default, §9.12); the others get 0.
- Context used for routing at position s: the tokens 0..s of the same sequence, i.e. exactly the
  prefix the experts condition on to predict token s+1 (the paper's "context so far"). No later
  token is ever looked at, so the mixture is a proper causal LM and its perplexity is honest.
  It is exact and cheap: all positions are routed in one pass (cumulative sums, one sort), so
  the router costs O(S log S + S·N) per sequence, negligible next to the experts. Early
  positions route on few tokens (position 0 on one token); that is the method, not a shortcut.
- Mixing happens in log space: log p = logsumexp_n(log w_n + log p_n), accumulated one expert
  at a time (memory: two [B, S, V] tensors, not N). An expert that no position of the batch
  chose is not run at all. With one expert, log w = 0 and the output is that expert's log-probs.

`BTMEnsemble` is evaluable like any model: `forward` returns a `TransformerOutput` whose
`logits` are the mixture's log-probabilities (so `log_softmax` leaves them unchanged).

On disk a BTM ensemble is a small folder: `btm.json` (format, domains, expert folders relative to
the BTM folder, top_k, τ, where the statistics came from) and `tfidf.safetensors` (`idf_V`,
`centroids_NV`). The experts stay where they are; keep the folders together when moving them.

Shape letters: B batch, S sequence, V vocabulary, N experts (= domains).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from upcycle.data import Manifest, load_manifest
from upcycle.errors import UpcycleError
from upcycle.eval.models import BTM_FILE, check_against_data, load_evaluable, vocab_size_of
from upcycle.eval.tfidf import DomainTfidf
from upcycle.model.transformer import TransformerOutput

BTM_FORMAT = "upcycle-btm"
BTM_FORMAT_VERSION = 1
TFIDF_FILE = "tfidf.safetensors"


class BTMEnsemble(nn.Module):
    """Expert n is the LM of domain `domain_tfidf.domains[n]`; see the module docstring."""

    def __init__(
        self,
        expert_models: Sequence[nn.Module],
        domain_tfidf: DomainTfidf,
        top_k: int = 2,
        temperature: float = 0.1,
        expert_paths: Sequence[str | Path] | None = None,
    ) -> None:
        super().__init__()
        check_settings(len(expert_models), len(domain_tfidf.domains), top_k, temperature)
        sizes = {vocab_size_of(m) for m in expert_models}
        if len(sizes) != 1:
            raise UpcycleError(
                f"BTM experts have different vocabularies {sorted(sizes)}; mix only branches of one seed model"
            )
        self.vocab_size = sizes.pop()
        if domain_tfidf.vocab_size < self.vocab_size:
            raise UpcycleError(
                f"the tf-idf statistics cover {domain_tfidf.vocab_size} ids but the experts have "
                f"{self.vocab_size}; rebuild them with the experts' vocabulary"
            )
        self.experts = nn.ModuleList(expert_models)
        self.tfidf = domain_tfidf
        self.top_k = min(top_k, len(expert_models))
        self.temperature = temperature
        self.expert_paths = [Path(p) for p in expert_paths] if expert_paths is not None else None

    @property
    def domains(self) -> list[str]:
        return self.tfidf.domains

    def route(
        self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log w [B, S, N] in fp32: log-softmax(similarity / τ) over the top-k, -inf elsewhere."""
        similarity_BSN = self.tfidf.prefix_similarity(input_ids_BS, attention_mask_BS)
        top_BSK, index_BSK = similarity_BSN.topk(self.top_k, dim=-1)
        log_weights_BSK = torch.log_softmax(top_BSK / self.temperature, dim=-1)
        return torch.full_like(similarity_BSN, float("-inf")).scatter(-1, index_BSK, log_weights_BSK)

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BS: torch.Tensor | None = None,
        position_ids_BS: torch.Tensor | None = None,
    ) -> TransformerOutput:
        log_weights_BSN = self.route(input_ids_BS, attention_mask_BS)
        mixed_BSV = None
        for n, expert in enumerate(self.experts):
            log_weight_BS = log_weights_BSN[..., n]
            if not bool(torch.isfinite(log_weight_BS).any()):
                continue  # no position chose this expert
            logits_BSV = expert(input_ids_BS, attention_mask_BS, position_ids_BS).logits
            term_BSV = torch.log_softmax(logits_BSV.float(), dim=-1) + log_weight_BS[..., None]
            mixed_BSV = term_BSV if mixed_BSV is None else torch.logaddexp(mixed_BSV, term_BSV)
        return TransformerOutput(logits=mixed_BSV)

    @classmethod
    def load(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> BTMEnsemble:
        spec = read_btm_spec(folder)
        experts = [load_evaluable(path, device=device, dtype=dtype) for path in spec.expert_paths]
        tensors = load_file(Path(folder) / TFIDF_FILE)
        tfidf = DomainTfidf(
            spec.domains,
            tensors["idf_V"],
            tensors["centroids_NV"],
            spec.tfidf["chunk_len"],
            spec.tfidf["chunks"],
        )
        # Only the statistics move: the experts were loaded onto `device` already, and a module-wide
        # `.to()` would fail on buffers that `load_model` leaves on the meta device (router steps).
        ensemble = cls(experts, tfidf.to(device), spec.top_k, spec.temperature, spec.expert_paths)
        return ensemble.eval()

    def save(
        self, folder: str | Path, overwrite: bool = False, provenance: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the BTM folder; needs the experts' folders (`expert_paths`, set by `load`)."""
        if self.expert_paths is None:
            raise UpcycleError(
                "this ensemble was built from models in memory; save each expert with upcycle.save_native "
                "and build the ensemble from their folders"
            )
        return save_btm(
            folder,
            dict(zip(self.domains, self.expert_paths, strict=True)),
            self.tfidf,
            self.top_k,
            self.temperature,
            overwrite=overwrite,
            provenance=provenance,
        )


@dataclass
class BTMSpec:
    """The contents of `btm.json`, with expert folders resolved."""

    domains: list[str]
    expert_paths: list[Path]
    top_k: int
    temperature: float
    tfidf: dict[str, Any]


def check_settings(num_experts: int, num_domains: int, top_k: int, temperature: float) -> None:
    if num_experts < 1 or num_experts != num_domains:
        raise UpcycleError(
            f"BTM needs one expert per domain: got {num_experts} experts for {num_domains} domains"
        )
    if top_k < 1:
        raise UpcycleError(f"BTM top_k must be ≥ 1, got {top_k}")
    if not temperature > 0:
        raise UpcycleError(f"BTM temperature must be > 0, got {temperature}")


def read_btm_spec(folder: str | Path) -> BTMSpec:
    folder = Path(folder)
    path = folder / BTM_FILE
    try:
        data = json.loads(path.read_text())
        if data.get("format") != BTM_FORMAT or data.get("format_version") != BTM_FORMAT_VERSION:
            raise UpcycleError(
                f"{path} is not a version-{BTM_FORMAT_VERSION} {BTM_FORMAT} file; rebuild it with `upcycle btm`"
            )
        experts = data["experts"]
        return BTMSpec(
            domains=[e["domain"] for e in experts],
            expert_paths=[(folder / e["path"]).resolve() for e in experts],
            top_k=int(data["top_k"]),
            temperature=float(data["temperature"]),
            tfidf=dict(data["tfidf"]),
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise UpcycleError(f"cannot read {path} ({error!r}); rebuild it with `upcycle btm`") from None


def save_btm(
    folder: str | Path,
    expert_paths: Mapping[str, str | Path],
    tfidf: DomainTfidf,
    top_k: int,
    temperature: float,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a BTM folder atomically; expert n is `expert_paths[tfidf.domains[n]]`."""
    from upcycle.checkpoint.atomic import atomic_output_dir

    if set(expert_paths) != set(tfidf.domains):
        raise UpcycleError(
            f"BTM experts are given for {sorted(expert_paths)} but the statistics cover {tfidf.domains}; "
            "give one expert per domain"
        )
    check_settings(len(expert_paths), len(tfidf.domains), top_k, temperature)
    target = Path(folder).absolute()
    spec = {
        "format": BTM_FORMAT,
        "format_version": BTM_FORMAT_VERSION,
        "experts": [
            {"domain": d, "path": os.path.relpath(Path(expert_paths[d]).absolute(), target)}
            for d in tfidf.domains
        ],
        "top_k": top_k,
        "temperature": temperature,
        "routing_context": "prefix: tokens 0..s of the sequence route the prediction of token s+1",
        "tfidf": {"chunk_len": tfidf.chunk_len, "chunks": tfidf.chunks, **(provenance or {})},
    }
    with atomic_output_dir(target, overwrite=overwrite) as staging:
        (staging / BTM_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        save_file(
            {"idf_V": tfidf.idf_V.contiguous().cpu(), "centroids_NV": tfidf.centroids_NV.contiguous().cpu()},
            staging / TFIDF_FILE,
        )
    return target


def build_btm(
    expert_paths: Mapping[str, str | Path],
    data: Manifest | str | Path,
    out_dir: str | Path,
    *,
    top_k: int = 2,
    temperature: float = 0.1,
    chunk_len: int = 256,
    chunks_per_domain: int = 1024,
    check_tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    """Compute the tf-idf statistics of each expert's domain from `data` and write a BTM folder.

    `expert_paths` maps a domain of the prepared data to the checkpoint folder of the expert
    trained on it. Nothing is loaded but configs and the training shards' tokens.
    """
    from upcycle.checkpoint import load_config
    from upcycle.checkpoint.atomic import check_target

    check_target(Path(out_dir), overwrite)
    manifest = data if isinstance(data, Manifest) else load_manifest(data)
    if not expert_paths:
        raise UpcycleError("BTM needs at least one expert; give DOMAIN=CHECKPOINT pairs")
    unknown = [d for d in expert_paths if d not in manifest.domains]
    if unknown:
        raise UpcycleError(
            f"domain {unknown[0]!r} is not in the data at {manifest.root} (it has: "
            f"{', '.join(sorted(manifest.domains))}); name experts after the data's domains"
        )
    check_settings(len(expert_paths), len(expert_paths), top_k, temperature)
    for path in expert_paths.values():
        check_against_data(path, manifest, check_tokenizer)
    sizes = {load_config(p).vocab_size for p in expert_paths.values()}
    if len(sizes) != 1:
        raise UpcycleError(
            f"BTM experts have different vocabularies {sorted(sizes)}; mix only branches of one seed model"
        )
    tfidf = DomainTfidf.from_manifest(
        manifest,
        list(expert_paths),
        vocab_size=sizes.pop(),
        chunk_len=chunk_len,
        chunks_per_domain=chunks_per_domain,
    )
    provenance = {"data": str(manifest.root), "data_fingerprint": manifest.fingerprint}
    return save_btm(out_dir, expert_paths, tfidf, top_k, temperature, overwrite, provenance)
