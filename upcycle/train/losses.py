"""The training loss: next-token cross-entropy plus every auxiliary loss the model returns.

    loss = lm_loss + Σ_layers Σ_kinds aux[layers.N.kind]

- `lm_loss` is the mean cross-entropy over the micro-batch's label positions, computed in fp32
  whatever the autocast dtype. Labels are already the next tokens (`Batch.labels_BS`), so no
  shift happens here.
- Aux losses come from the model already multiplied by their coefficients (model/losses.py),
  one per MoE/MoA layer and kind (`moe_load_balancing`, `moe_z_loss`, `moa_z_loss`). All of them
  are added; for logging they are also summed per kind over layers, so a run that silently lost
  its aux loss shows `loss == lm_loss`.
- An MoE layer's aux loss is computed over the tokens of one forward call (a micro-batch), as
  Megatron does; the value of a step is the mean over its micro-batches (and ranks).

Shape letters: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from upcycle.kernels.cross_entropy import mean_cross_entropy
from upcycle.model.transformer import TransformerOutput


@dataclass
class LossParts:
    """The loss to differentiate and its parts (graph-attached tensors)."""

    total: torch.Tensor
    lm: torch.Tensor
    aux_by_kind: dict[str, torch.Tensor]


def aux_kind(name: str) -> str:
    """`layers.3.moe_load_balancing` -> `moe_load_balancing`."""
    return name.rsplit(".", 1)[-1]


# the mean cross-entropy in fp32 (torch's, written once in upcycle.kernels.cross_entropy)
lm_loss = mean_cross_entropy


def training_loss(
    output: TransformerOutput,
    labels_BS: torch.Tensor,
    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss,
) -> LossParts:
    """Cross-entropy plus every aux loss; aux losses also summed per kind for logging.

    `cross_entropy` is `lm_loss` or a compiled copy of it (`TrainStep(compile_loss=True)`)."""
    return combine_losses(cross_entropy(output.logits, labels_BS), output.aux_losses)


def combine_losses(lm: torch.Tensor, aux_losses: dict[str, torch.Tensor]) -> LossParts:
    """The LM loss plus every aux loss, the aux losses also summed per kind (`training_loss`;
    `upcycle.train.step` calls it directly with the fused LM-head cross-entropy)."""
    aux_by_kind: dict[str, torch.Tensor] = {}
    for name, value in aux_losses.items():
        kind = aux_kind(name)
        aux_by_kind[kind] = aux_by_kind.get(kind, 0) + value.float()
    total = lm + sum(aux_by_kind.values()) if aux_by_kind else lm
    return LossParts(total=total, lm=lm, aux_by_kind=aux_by_kind)
