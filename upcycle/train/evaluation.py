"""Held-out loss and perplexity per domain during training.

Each domain's held-out windows (`HeldoutBatches`: the same text on every pass, shared out over
ranks) are scored with the mean next-token cross-entropy over all their label positions;
perplexity is its exponential. Aux losses are not part of it: this is the language-model loss
that runs and recipes are compared on.

Under FSDP2 every forward pass is a collective, so every rank must run the same number of them:
a rank whose share of windows ran out runs a one-row dummy batch and ignores its result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.data import HeldoutBatches, Manifest
from upcycle.train.distributed import Distributed
from upcycle.train.step import autocast_context, model_inputs


def eval_domains(manifest: Manifest, seq_len: int) -> list[str]:
    """Domains with at least one held-out window of `seq_len` + 1 tokens."""
    return [d for d in sorted(manifest.domains) if manifest.split(d, "heldout").tokens >= seq_len + 1]


@torch.no_grad()
def evaluate_heldout(
    model: nn.Module,
    manifest: Manifest,
    domains: list[str],
    seq_len: int,
    batch_size: int,
    max_sequences: int | None,
    distributed: Distributed,
    autocast_dtype: torch.dtype | None,
) -> dict[str, dict[str, float]]:
    """{domain: {"loss", "perplexity", "tokens"}} over every rank's share of held-out windows."""
    was_training = model.training
    model.eval()
    results = {}
    try:
        for domain in domains:
            batches = HeldoutBatches(
                manifest,
                domain,
                seq_len,
                batch_size,
                max_sequences=max_sequences,
                rank=distributed.rank,
                world_size=distributed.world_size,
            )
            loss_sum, tokens = _score(model, batches, seq_len, distributed, autocast_dtype)
            mean = loss_sum / tokens
            results[domain] = {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": int(tokens)}
    finally:
        model.train(was_training)
    return results


def _score(
    model: nn.Module,
    batches: HeldoutBatches,
    seq_len: int,
    distributed: Distributed,
    autocast_dtype: torch.dtype | None,
) -> tuple[float, float]:
    device = distributed.device
    passes = distributed.all_reduce_max(math.ceil(batches.num_sequences / batches.batch_size))
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, label positions]
    iterator = iter(batches)
    for _ in range(passes):
        batch = next(iterator, None)
        if batch is None:
            with autocast_context(device, autocast_dtype):
                model(torch.zeros(1, seq_len, dtype=torch.long, device=device))
            continue
        input_ids_BS, labels_BS = model_inputs(batch, device)
        with autocast_context(device, autocast_dtype):
            logits_BSV = model(input_ids_BS).logits
        loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), reduction="sum")
        sums += torch.stack(
            [loss.double(), torch.tensor(labels_BS.numel(), dtype=torch.float64, device=device)]
        )
    loss_sum, tokens = distributed.all_reduce_sum(sums).tolist()
    return loss_sum, tokens
