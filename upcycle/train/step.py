"""`TrainStep`: one optimiser step over this rank's micro-batches, shared by the trainer and
bench/train_step.py.

Order inside a step, and why:
1. write the scheduled learning rate into the optimiser; tell every router the step (only
   sample_top1 reads it: its temperature decays with the step);
2. for each micro-batch: forward under autocast (bf16 on CUDA) or in fp32, loss = lm + Σ aux
   (on one CUDA device the LM head and its cross-entropy are one function that writes the
   loss's gradient over the logits: `upcycle.kernels.cross_entropy`),
   backward of loss / micro-batches; FSDP2 reduce-scatters only after the last micro-batch, and
   averages over ranks, so the gradient is the mean over the whole global batch;
3. the global gradient norm (before clipping), then ONE host synchronisation that fetches the
   loss parts, the norm and the expert loads, summed over micro-batches and ranks;
4. a non-finite loss or norm stops here, before the optimiser step (`NonFiniteLossError`
   names the step) or, with the skip policy, drops this step's update;
5. clip to `clip_grad_norm` with the norm already computed, optimiser step, zero the gradients
   (a fused AdamW applies the clipping factor as it reads each gradient: `_clip_and_step`).

With a fused AdamW on plain tensors (one GPU, `_folds_clipping`) steps 3-5 are reordered so that
the host does not wait for the GPU before queueing the optimiser step: the values start their
way to host memory (`HostCopy`), the step is queued with a `found_inf` flag computed on the
device (the fused kernel then leaves weights, moments and step count untouched: the same outcome
as not stepping), and only then does the host wait, for the copy alone, while the GPU still has
the optimiser step to run. The next step's kernels are queued behind it instead of after an idle
gap. The non-finite decision and its messages are those of the plain order.

With `cuda_graph` (`train.cuda_graph`, one GPU) steps 2-5 of every step after a short warm-up
are one replayed CUDA graph (`upcycle.train.cuda_graph`); the values are read after it, and
`launch` returns before that read (`PendingStep`), so that the trainer queues the next step
first.

Shape letters: B batch, S sequence, E experts.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from upcycle.data import Batch
from upcycle.errors import UpcycleError
from upcycle.kernels import cross_entropy
from upcycle.kernels.cross_entropy import linear_cross_entropy
from upcycle.kernels.host_copy import HostCopy, page_locked
from upcycle.model.moe import MoE
from upcycle.model.router import Router
from upcycle.model.transformer import Transformer
from upcycle.train.cuda_graph import StepGraph, check_supported
from upcycle.train.distributed import Distributed, set_gradient_sync
from upcycle.train.expert_parallel import clip_grads, grad_norm
from upcycle.train.losses import combine_losses, lm_loss, training_loss
from upcycle.train.optim import AdamW, set_learning_rate
from upcycle.train.pending import PendingStep
from upcycle.train.schedule import WarmupCosine


class NonFiniteLossError(UpcycleError):
    """A non-finite loss or gradient norm stopped the run before the optimiser step."""

    exit_code = 3


@dataclass
class StepResult:
    """What one step did, as Python numbers (means over micro-batches and ranks)."""

    step: int
    loss: float
    lm_loss: float
    aux_losses: dict[str, float]
    grad_norm: float
    lr: float
    skipped: bool = False
    expert_load: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> tokens per expert


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without waiting for the GPU: a copy from pageable host memory first waits
    for everything queued on the stream (the previous step's optimiser), so host tensors bound for
    a GPU go through page-locked memory, whose copy is queued like a kernel (torch's caching host
    allocator keeps the page-locked block until the copy has run)."""
    return page_locked(t, device).to(device, non_blocking=True)


def model_inputs(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) on the device; labels are the next tokens, already shifted by the data."""
    return to_device(batch.input_ids_BS, device), to_device(batch.labels_BS, device)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _folds_clipping(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor]) -> bool:
    """True for a fused AdamW (torch's, or upcycle's built on it) over plain (not DTensor,
    one-device) parameters."""
    if type(optimizer) not in (torch.optim.AdamW, AdamW) or not optimizer.defaults.get("fused"):
        return False
    devices = {p.device for p in parameters}
    return len(devices) == 1 and all(type(p.data) is torch.Tensor for p in parameters)


class TrainStep:
    """Callable `(step, micro_batches) -> StepResult` over a model and its optimiser."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: WarmupCosine,
        distributed: Distributed,
        *,
        clip_grad_norm: float | None,
        autocast_dtype: torch.dtype | None,
        nonfinite_policy: str = "stop",
        compile_loss: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.distributed = distributed
        self.clip_grad_norm, self.autocast_dtype = clip_grad_norm, autocast_dtype
        self.nonfinite_policy = nonfinite_policy
        self.moe_layers = [(i, b.mlp) for i, b in enumerate(model.model.layers) if isinstance(b.mlp, MoE)]
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # `train.compile`: the cross-entropy over the vocabulary is compiled too (one fused pass
        # forward and one backward instead of an fp32 copy of the logits and a softmax each way).
        self.lm_loss = torch.compile(lm_loss, dynamic=False) if compile_loss else lm_loss
        # one CUDA device: the LM head and its cross-entropy in one function, the loss's gradient
        # written over the logits in the forward pass (`upcycle.kernels.cross_entropy`); not
        # under FSDP, whose hooks run on the model's own forward
        self.fused_lm_loss = (
            distributed.world_size == 1
            and isinstance(model, Transformer)
            and distributed.device.type == "cuda"
            and cross_entropy.triton_installed()
        )
        self.fold_clip = _folds_clipping(optimizer, self.trainable)
        # graphed steps launched and not yet read (`launch`), oldest first
        self.in_flight: list[PendingStep] = []
        # `train.cuda_graph`: every step after a short warm-up replays one captured graph
        self.graph: StepGraph | None = None
        if cuda_graph:
            compute_dtype = autocast_dtype or next(iter(model.parameters())).dtype
            check_supported(distributed.device, distributed.world_size, self.fold_clip, model, compute_dtype)
            self.graph = StepGraph(self)

    def __call__(self, step: int, micro_batches: list[Batch]) -> StepResult:
        """Run one step and read its values (`launch(...).result()`)."""
        return self.launch(step, micro_batches).result()

    def launch(self, step: int, micro_batches: list[Batch]) -> PendingStep:
        """Run one step; a replayed CUDA graph returns as soon as it is queued, and its values are
        read by the `PendingStep`'s `result()` (`upcycle.train.pending`). A loop that launches
        step s + 1 before reading step s keeps the GPU busy while the host logs and loads the next
        batch; every other step (eager, warm-up) has run when this returns, after the steps in
        flight were read."""
        lr = self.schedule(step)
        for router in self.routers:
            router.set_step(step - 1)  # queued on the stream, behind any step in flight
        if self.graph is not None:
            return self.graph.launch(step, lr, micro_batches)
        set_learning_rate(self.optimizer, lr)
        return PendingStep.settled(step, self.eager_step(step, lr, self.device_inputs(micro_batches)))

    def drain(self) -> None:
        """Read every step in flight (raising what the first failing one raised)."""
        if self.in_flight:
            self.in_flight[-1].result()

    def device_inputs(self, micro_batches: list[Batch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input ids, labels) of each micro-batch on the device (`model_inputs`)."""
        return [model_inputs(batch, self.distributed.device) for batch in micro_batches]

    def eager_step(self, step: int, lr: float, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """Steps 2-5 (module docstring) over (input ids, labels) pairs already on the device,
        the learning rate already in the optimiser."""
        sums, aux_kinds = self._forward_backward(inputs)
        norm = self._grad_norm()
        passes = len(inputs) * self.distributed.world_size
        if self.fold_clip:
            result = self._step_before_reading(step, lr, sums, norm, aux_kinds, passes)
        else:
            result = self.result(step, lr, self._reduce(sums, norm).tolist(), aux_kinds, passes)
            if self._finite(result):
                self._clip_and_step(norm)
        self.optimizer.zero_grad(set_to_none=True)
        return self.check_finite(result)

    def check_finite(self, result: StepResult) -> StepResult:
        """Step 4's outcome for a step whose update was skipped if it was not finite: raise
        under the stop policy, else mark the result skipped."""
        if self._finite(result):
            return result
        if self.nonfinite_policy == "stop":
            raise NonFiniteLossError(
                f"step {result.step}: the loss is {result.loss} and the gradient norm {result.grad_norm}; "
                f"the run stopped before the optimizer step, so the weights are those of step {result.step - 1}; "
                "lower optimizer.lr or check the data, and resume from the last checkpoint"
            )
        result.skipped = True
        return result

    @staticmethod
    def _finite(result: StepResult) -> bool:
        return math.isfinite(result.loss) and math.isfinite(result.grad_norm)

    def device_step(
        self, inputs: list[tuple[torch.Tensor, torch.Tensor]], halted: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Steps 2-5 with no host synchronisation (a fused AdamW only): the values that
        `result` reads ([sums..., norm] on the device) and the aux-loss kinds. What
        `upcycle.train.cuda_graph` captures. `halted` (stop policy, fp32 0/1 on the device):
        set by a non-finite step and kept, so that every step after it skips its update too,
        as the host has not read the values when later steps are queued (`launch`)."""
        sums, aux_kinds = self._forward_backward(inputs)
        norm = self._grad_norm()
        values = self._reduce(sums, norm)
        found_inf = self._found_inf(values)
        if halted is not None:
            found_inf = torch.maximum(found_inf, halted)
            halted.copy_(found_inf)
        self._clip_and_step(norm, found_inf)
        return values, aux_kinds

    @staticmethod
    def _found_inf(values: torch.Tensor) -> torch.Tensor:
        """1.0 on the device where the loss (first value) or the norm (last) is not finite."""
        return (~(torch.isfinite(values[0]) & torch.isfinite(values[-1]))).float()

    def _step_before_reading(
        self,
        step: int,
        lr: float,
        sums: list[torch.Tensor],
        norm: torch.Tensor,
        aux_kinds: list[str],
        passes: int,
    ) -> StepResult:
        """Steps 3-5 for a fused AdamW (module docstring): queue the copy of the values, then the
        optimiser step guarded on the device by `found_inf`, then read the values."""
        values = self._reduce(sums, norm)
        pending = HostCopy(values)
        stateless = [p for p in self.trainable if p not in self.optimizer.state]
        self._clip_and_step(norm, self._found_inf(values))
        result = self.result(step, lr, pending.tolist(), aux_kinds, passes)
        if not self._finite(result):
            # a skipped first step still created AdamW's state (zero moments, step 0): drop it,
            # so that checkpoints hold what the plain order leaves, no state at all
            for parameter in stateless:
                self.optimizer.state.pop(parameter, None)
        return result

    def _clip_and_step(self, norm: torch.Tensor, found_inf: torch.Tensor | None = None) -> None:
        """Clip to `clip_grad_norm` with the norm already computed, then the optimiser step.

        With a fused AdamW on plain tensors the clipping factor goes in as the optimiser's
        `grad_scale` (the kernel divides each gradient by it as it reads it; torch's stores the
        result back, upcycle's Triton pass does not), which saves a separate read and write of
        every gradient; `found_inf`
        (fused AdamW only: 1.0 skips the update inside the kernel) guards the step on the device.
        """
        if not self.fold_clip:
            if self.clip_grad_norm is not None:
                clip_grads(self.trainable, self.clip_grad_norm, norm)
            self.optimizer.step()
            return
        flags = {"found_inf": found_inf} if found_inf is not None else {}
        if self.clip_grad_norm is not None:
            # torch's rule: coef = min(1, max_norm / (norm + 1e-6)); the kernel divides by 1 / coef
            divisor = torch.clamp((norm.detach().float() + 1e-6) / self.clip_grad_norm, min=1.0)
            flags["grad_scale"] = divisor
        for name, value in flags.items():
            setattr(self.optimizer, name, value)
        try:
            self.optimizer.step()
        finally:
            for name in flags:
                delattr(self.optimizer, name)

    def _forward_backward(
        self, inputs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list[str]]:
        """Run every micro-batch ((input ids, labels) on the device); return detached sums
        [total, lm, aux kinds..., expert loads...]."""
        device = self.distributed.device
        sums: list[torch.Tensor] | None = None
        aux_kinds: list[str] = []
        for index, (input_ids_BS, labels_BS) in enumerate(inputs):
            set_gradient_sync(self.model, index == len(inputs) - 1)
            if self.fused_lm_loss:
                with autocast_context(device, self.autocast_dtype):
                    h_BSD, aux_losses = self.model.hidden_states(input_ids_BS)
                    lm = linear_cross_entropy(h_BSD, self.model.output_weight, labels_BS)
                parts = combine_losses(lm, aux_losses)
            else:
                with autocast_context(device, self.autocast_dtype):
                    output = self.model(input_ids_BS)
                parts = training_loss(output, labels_BS, self.lm_loss)
            aux_kinds = sorted(parts.aux_by_kind)
            # Read before backward: activation checkpointing re-runs the forward in backward.
            stats = [parts.total, parts.lm, *(parts.aux_by_kind[k] for k in aux_kinds)]
            stats += [moe.expert_load for _, moe in self.moe_layers]
            stats = [s.detach().reshape(-1).to(torch.float64) for s in stats]
            sums = stats if sums is None else [a + b for a, b in zip(sums, stats, strict=True)]
            (parts.total / len(inputs)).backward()
        assert sums is not None, "a step needs at least one micro-batch"
        return sums, aux_kinds

    def _grad_norm(self) -> torch.Tensor:
        # Under FSDP2 the gradients are DTensor shards and so is their norm; `grad_norm` makes it
        # global, one mesh at a time (expert parallelism puts the experts on a mesh of their own).
        return grad_norm(self.trainable, self.distributed.device)

    def _reduce(self, sums: list[torch.Tensor], norm: torch.Tensor) -> torch.Tensor:
        """[sums over ranks..., norm] on the device, for one host synchronisation."""
        flat = self.distributed.all_reduce_sum(torch.cat(sums))
        return torch.cat([flat, norm.detach().reshape(1).to(flat)])

    def result(
        self, step: int, lr: float, values: list[float], aux_kinds: list[str], passes: int
    ) -> StepResult:
        """Means over the `passes` forward passes (micro-batches × ranks) of the step."""
        total, lm, *rest = values[:-1]
        aux = {k: rest[i] / passes for i, k in enumerate(aux_kinds)}
        loads, offset = {}, len(aux_kinds)
        for layer, moe in self.moe_layers:
            loads[layer] = [int(v) for v in rest[offset : offset + moe.num_experts]]
            offset += moe.num_experts
        return StepResult(step, total / passes, lm / passes, aux, values[-1], lr, expert_load=loads)


def benchmark_step(
    model: nn.Module, distributed: Distributed, compile_loss: bool = False, cuda_graph: bool = False
) -> TrainStep:
    """The step bench/train_step.py and bench/scaling.py time: AdamW (fused on CUDA) at a constant
    learning rate of 1e-4, clipping at 1.0, bf16 autocast on CUDA (fp32 elsewhere); `cuda_graph`
    replays the whole step as one CUDA graph (`upcycle.train.cuda_graph`)."""
    from upcycle.train.config import OptimizerConfig
    from upcycle.train.optim import build_optimizer

    device = distributed.device
    return TrainStep(
        model,
        build_optimizer(model, OptimizerConfig(lr=1e-4), device),
        WarmupCosine(1e-4, 0, 10**9, 1.0),
        distributed,
        clip_grad_norm=1.0,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        compile_loss=compile_loss,
        cuda_graph=cuda_graph,
    )
