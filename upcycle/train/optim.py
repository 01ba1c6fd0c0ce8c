"""Which parameters train (freezing), and the AdamW optimiser over them.

Freeze modes, by parameter role (roles come from module types, not from name patterns, so BAM's
attention router and the FFN router are both found):

| mode | frozen | trains |
|---|---|---|
| `none` | nothing | everything |
| `experts` | routed FFN experts and shared experts (`mlp.experts.*`, `mlp.shared_expert*`) | the rest, routers included |
| `attention` | every attention parameter (`self_attn.*`), BAM's attention experts included, except its router | the rest |
| `all_but_routers` | everything except routers (`mlp.gate`, `self_attn.router`) | routers only |

A mode that would freeze nothing it names (experts of a dense model) or leave nothing to train
(routers of a dense model) is refused: it is almost surely the wrong config.

Weight decay applies to parameters with two or more dimensions (matrices, stacked experts,
embeddings, routers); norms' weights and biases are not decayed, as in GPT-2, Llama and OLMo.
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.model.moe import MoE
from upcycle.model.router import Router
from upcycle.train.config import FreezeMode, OptimizerConfig


def _router_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for module in model.modules() if isinstance(module, Router) for p in module.parameters()}


def _expert_parameter_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, MoE):
            for part in (module.experts, module.shared_expert, module.shared_expert_gate):
                if part is not None:
                    ids |= {id(p) for p in part.parameters()}
    return ids


def _attention_parameter_ids(model: nn.Module) -> set[int]:
    ids = {id(p) for block in model.model.layers for p in block.self_attn.parameters()}
    return ids - _router_parameter_ids(model)


def freeze_parameters(model: nn.Module, mode: FreezeMode) -> int:
    """Set `requires_grad` by `mode`; return the number of trainable parameters."""
    if mode == "none":
        frozen: set[int] = set()
    elif mode == "experts":
        frozen = _expert_parameter_ids(model)
        if not frozen:
            raise UpcycleError("freeze: experts, but the model has no MoE layer; use freeze: none")
    elif mode == "attention":
        frozen = _attention_parameter_ids(model)
    else:
        routers = _router_parameter_ids(model)
        if not routers:
            raise UpcycleError(
                "freeze: all_but_routers leaves nothing to train in a model without routers; "
                "use freeze: none or train an MoE model"
            )
        frozen = {id(p) for p in model.parameters()} - routers
    trainable = 0
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable


def build_optimizer(model: nn.Module, config: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in two groups: decayed (ndim ≥ 2) and not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = device.type == "cuda" if config.fused is None else config.fused
    if fused and device.type != "cuda":
        raise UpcycleError("optimizer.fused needs a CUDA device; remove it or set it to false on CPU")
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
