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

On CUDA (`optimizer.fused`, default there) the optimiser is `AdamW`: torch's fused AdamW, with
each tensor of at least `upcycle.kernels.adamw.MIN_NUMEL` elements (stacked experts, embeddings,
the LM head) updated by one Triton pass at memory bandwidth instead. Its state is torch's (a
checkpoint of either loads into the other).
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.kernels import adamw as adamw_kernel
from upcycle.kernels.swiglu import triton_installed
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
    if fused and triton_installed():
        return AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None)


def _torch_step(optimizer: torch.optim.AdamW) -> None:
    """torch's AdamW step without its hook wrapper: once any torch AdamW exists, torch wraps the
    class's `step` to run the step hooks, which `AdamW.step`'s own wrapper already ran."""
    step = torch.optim.AdamW.step
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    step(optimizer)


class AdamW(torch.optim.AdamW):
    """torch's fused AdamW, with every large tensor updated by `upcycle.kernels.adamw.adamw_`.

    Same hyperparameters, state (`step` as a float32 tensor on the parameter's device,
    `exp_avg`, `exp_avg_sq`) and update as `torch.optim.AdamW(fused=True)`, and the same
    `grad_scale` / `found_inf` attributes (`upcycle.train.step` sets them to fold gradient
    clipping into the step and to guard it on the device). What differs: a tensor that
    `adamw_kernel.supports` takes (a plain contiguous CUDA tensor of at least
    `adamw_kernel.MIN_NUMEL` elements, its gradient and moments alike) is updated in one Triton
    pass of its own, which reads its gradient without writing the rescaled gradient back (torch's
    kernel does, with `grad_scale`: after a step, small tensors hold the rescaled gradient and
    large ones the gradient as it was). Everything else (small tensors, sparse gradients, groups
    with amsgrad, maximize, differentiable or tensor betas, a learning rate in a tensor other than
    one float32 value, DTensor shards) goes to torch's fused kernel, first: an error there leaves
    the large tensors untouched. Capturable groups and a float32 learning-rate tensor (how
    `upcycle.train.cuda_graph` replays a whole step) take the Triton pass too.
    Measured in bench/RESULTS.md (seventh round).
    """

    def __init__(self, params, *args, **kwargs) -> None:
        if kwargs.pop("fused", True) is not True:
            raise ValueError("upcycle's AdamW is fused; use torch.optim.AdamW for the unfused one")
        super().__init__(params, *args, fused=True, **kwargs)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then this optimiser's own settings back: loading replaces each group's
        `fused` / `foreach` with the checkpoint's (an unfused run's checkpoint would turn the
        fused kernel off, under a `grad_scale` that only it accepts), and an unfused run keeps
        step counts on the CPU, where the fused kernels read them on the parameter's device."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["fused"], group["foreach"] = True, None
            for param in group["params"]:
                state = self.state.get(param)
                if state and "step" in state:
                    state["step"] = state["step"].to(device=param.device, dtype=torch.float32)

    def _ours(self, group: dict) -> list[torch.Tensor]:
        """The parameters of `group` that the Triton kernel updates, their state created as
        torch would create it."""
        # capturable groups qualify: this path keeps its step counts and factors on the device
        plain = not (group["amsgrad"] or group["maximize"] or group["differentiable"])
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and (lr.numel() != 1 or lr.dtype != torch.float32):
            return []
        if not plain or any(isinstance(v, torch.Tensor) for v in group["betas"]):
            return []
        ours = []
        for param in group["params"]:
            if not adamw_kernel.supports(param):
                continue
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if adamw_kernel.supports(param, state["exp_avg"], state["exp_avg_sq"]):
                ours.append(param)
        return ours

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        adamw_kernel.check_scalars(grad_scale, found_inf)
        groups = [(group, self._ours(group)) for group in self.param_groups]
        # torch's kernel first, over what is left: our tensors' gradients hidden from it
        held = [(param, param.grad) for _, ours in groups for param in ours]
        try:
            for param, _ in held:
                param.grad = None
            _torch_step(self)
        finally:
            for param, grad in held:
                param.grad = grad
        for group, ours in groups:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for param in ours:
                by_device.setdefault(param.device, []).append(param)
            for device, params in by_device.items():
                self._step_ours(group, params, grad_scale, found_inf, device)
        return loss

    def _step_ours(self, group: dict, params: list[torch.Tensor], grad_scale, found_inf, device) -> None:
        """The Triton pass over `params` (one group, one device), step counts as torch keeps
        them: advanced before the update, taken back where `found_inf` is 1."""
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        factors = adamw_kernel.bias_factors(steps, group["lr"], beta1, beta2)
        if found_inf is not None:
            found_inf = found_inf.to(device, non_blocking=True)
        for param, row in zip(params, factors, strict=True):
            state = self.state[param]
            adamw_kernel.adamw_(
                param, param.grad, state["exp_avg"], state["exp_avg_sq"], row,
                beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], grad_scale=grad_scale, found_inf=found_inf,
            )  # fmt: skip
        if found_inf is not None:
            torch._foreach_sub_(steps, [found_inf] * len(steps))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float | torch.Tensor) -> None:
    """Every group's learning rate: a float, or a one-value tensor that the groups share
    (a CUDA-graphed step fills it with each step's value)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
