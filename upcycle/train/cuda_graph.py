"""`train.cuda_graph`: the whole training step (forward, backward, gradient norm, clipping, AdamW)
replayed as one CUDA graph, so that the host launches one graph a step instead of thousands of
kernels.

Why: a compiled MoE step issues its kernels about as fast as an H100 runs them, so the step time
follows the host CPU (bench/RESULTS.md, seventh and eighth rounds: the same code 53.8 ms on one
machine, 64–79 ms on others, with the GPU waiting for launches in every backward block). A
replayed graph costs the host microseconds, whatever its speed.

How a step runs with `cuda_graph`:
1. The micro-batches are copied into static input tensors (one (input ids, labels) pair per
   micro-batch, allocated for the first shape seen), the scheduled learning rate into a float32
   tensor that every optimiser group holds as its `lr` during the step (the float is put back
   after it, for checkpoints), and each router's step into its buffer.
2. The first `WARMUP_STEPS` steps (of one shape: a new shape before the capture starts the
   warm-up again) run eagerly on a side stream, from those same tensors: they
   compile the blocks, create the optimiser's state and initialise every library lazily, as
   capture requires. The last of them runs exactly what will be captured (no host counts) with
   torch's synchronisation check set to raise: a step that would wait for the host (a layer
   that reads a value on the host) stops there with a traceback and one sentence, instead of
   invalidating a capture.
3. The next step is captured (`TrainStep.device_step`: forward and backward of each micro-batch,
   gradient norm, the device-side `found_inf` guard, AdamW with clipping folded in), then
   replayed; every later step of the same shapes is a replay.
4. After each replay the values (loss parts, expert loads, norm) start their way to host memory
   and `launch` returns a `PendingStep` (`upcycle.train.pending`) without waiting: the trainer
   launches step s + 1 before it reads step s, so the GPU runs the next graph while the host
   logs and loads a batch. Reading a step gives the eager step's outcome: a non-finite step
   (whose update the `found_inf` guard already skipped inside the graph) stops the run or is
   marked skipped. Under the stop policy the captured step also sets a `halted` flag on the
   device, which every later replay honours, so a step queued behind a non-finite one before
   the host read it changes nothing either (its `result()` says it was abandoned); the flag is
   cleared when the stop is raised.

What changes inside the step: the per-expert weight-gradient GEMMs of few-expert MoE layers need
row counts on the host, which a graph cannot read, so a captured step computes them with
`torch._grouped_mm` from the counts on the device (`grouped_moe.wants_host_counts`): the same
products, summed by another kernel. The learning rate reaches the optimiser as a float32 tensor
(`upcycle.train.optim.AdamW` and torch's fused kernel read it on the device), i.e. rounded to
fp32 where the eager step uses the float: bit for bit the same update where the rate is exact in
fp32, otherwise within that rounding. Everything else is the eager step's code and kernels.

Steps of another shape than the captured one (a last, shorter batch) run eagerly; loading an
optimiser state (`load_state_dict`, on resume) drops the graph, which the next step captures
again after its warm-up. The graph holds its activations and gradients in a memory pool of its
own. Needs one CUDA device, one process, a fused AdamW over plain tensors (the default on CUDA)
and MoE experts on `torch._grouped_mm` without host reads (`moe.implementation: auto` or
`grouped`, bf16 compute on a GPU of compute capability 9.x or 10.x; elsewhere the experts read
row counts on the host); `TrainStep` refuses anything else before the first step. An
out-of-memory error during the capture is raised as it is; a parameter whose optimiser state the
capture itself would create (its first gradient only then) is refused.

Tested (tests/test_cuda_graph.py) on the CPU with the CUDA calls recorded (the order of work
above, the refusals, the failures) and on the GPU: replayed steps against eager steps of the same
model and data, the weight gradients on `torch._grouped_mm` in both: weights and optimiser state
bit for bit after several steps, with a batch of another shape in between, and with compiled
blocks; a non-finite step skipped inside the graph; `train` with `cuda_graph: true`.
"""

from __future__ import annotations

import contextlib

import torch

from upcycle.data import Batch
from upcycle.errors import UpcycleError
from upcycle.kernels import grouped_moe
from upcycle.kernels.host_copy import HostCopy, page_locked
from upcycle.model.moe import MoE
from upcycle.train.optim import set_learning_rate
from upcycle.train.pending import PendingStep

# Eager steps on the capture stream before the first capture: the first compiles the blocks and
# creates the optimiser's state, the second runs everything once more as it will be captured.
WARMUP_STEPS = 2


def check_supported(
    device: torch.device,
    world_size: int,
    fused_adamw: bool,
    model: torch.nn.Module,
    compute_dtype: torch.dtype,
) -> None:
    """Refuse, in one sentence with the fix, a run the graphed step cannot serve. `compute_dtype`:
    what the MoE layers will compute in (the autocast dtype, else the weights')."""
    if device.type != "cuda":
        raise UpcycleError("train.cuda_graph needs a CUDA device; set cuda_graph: false on this machine")
    if world_size != 1:
        raise UpcycleError(
            "train.cuda_graph runs on one GPU in one process; set cuda_graph: false for distributed training"
        )
    if not fused_adamw:
        raise UpcycleError(
            "train.cuda_graph needs the fused AdamW over plain tensors; remove optimizer.fused: false "
            "or set cuda_graph: false"
        )
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if moe.implementation == "eager":
            raise UpcycleError(
                "train.cuda_graph needs the grouped MoE experts (the eager ones read row counts on the "
                "host, which a CUDA graph cannot); set moe.implementation: auto or grouped, or cuda_graph: false"
            )
        widths = tuple(moe.experts.down_proj.shape[1:])
        if not grouped_moe.grouped_mm_available(device, compute_dtype, widths):
            raise UpcycleError(
                f"train.cuda_graph needs the MoE experts on torch._grouped_mm, which this GPU and "
                f"{str(compute_dtype).removeprefix('torch.')} compute do not give (it takes bf16 on "
                "compute capability 9.x or 10.x; elsewhere the experts read row counts on the host); "
                "set precision: bf16 or bf16-weights on such a GPU, or cuda_graph: false"
            )


@contextlib.contextmanager
def _host_reads_refused():
    """torch's synchronisation check set to raise: a step that would stall a capture fails here,
    before it, with a Python traceback, instead of invalidating the capture."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _key(micro_batches: list[Batch]) -> tuple:
    return tuple(
        (tuple(b.input_ids_BS.shape), b.input_ids_BS.dtype, tuple(b.labels_BS.shape), b.labels_BS.dtype)
        for b in micro_batches
    )


def _load(static: torch.Tensor, source: torch.Tensor) -> None:
    """Copy `source` into `static` without waiting for the GPU (host tensors through
    page-locked memory, as `upcycle.train.step.to_device`)."""
    static.copy_(page_locked(source, static.device), non_blocking=True)


class StepGraph:
    """The graphed step of one `TrainStep` (`owner`), called as `(step, lr, micro_batches)`."""

    def __init__(self, owner) -> None:
        device = owner.distributed.device
        self.owner = owner
        self.stream = torch.cuda.Stream(device)
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.key: tuple | None = None
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graph: torch.cuda.CUDAGraph | None = None
        self.values: torch.Tensor | None = None
        self.aux_kinds: list[str] = []
        self.warm_steps = 0
        self.replays = 0
        # stop policy: set on the device by a non-finite step, so that the steps queued behind it
        # before the host reads it (`launch`) leave the weights and optimiser state as they are
        self.halted: torch.Tensor | None = None
        if owner.nonfinite_policy == "stop":
            self.halted = torch.zeros((), dtype=torch.float32, device=device)
        owner.optimizer.register_load_state_dict_post_hook(lambda optimizer: self.reset())

    def reset(self) -> None:
        """Drop the graph (its memory pool goes with it); the next step warms up and captures
        again."""
        self.graph, self.values, self.warm_steps = None, None, 0

    def __call__(self, step: int, lr: float, micro_batches: list[Batch]):
        """One step, its values read before returning (`launch(...).result()`)."""
        return self.launch(step, lr, micro_batches).result()

    def launch(self, step: int, lr: float, micro_batches: list[Batch]) -> PendingStep:
        """Queue one step; a replay returns before the GPU has run it (step 4 of the module
        docstring happens in the `PendingStep`'s `result()`), an eager step after it ran."""
        owner = self.owner
        if not self._replays(micro_batches):
            # an eager step waits for the GPU anyway: the steps in flight are read first, so an
            # earlier step that ends the run stops it before this one changes anything
            owner.drain()
        self.lr.fill_(lr)
        set_learning_rate(owner.optimizer, self.lr)
        try:
            return self._step(step, lr, micro_batches)
        finally:
            # the float back where checkpoints and other code read the rate; the graph reads
            # self.lr, the tensor it captured
            set_learning_rate(owner.optimizer, lr)

    def _replays(self, micro_batches: list[Batch]) -> bool:
        return self.graph is not None and _key(micro_batches) == self.key

    def _step(self, step: int, lr: float, micro_batches: list[Batch]) -> PendingStep:
        owner = self.owner
        key = _key(micro_batches)
        device = owner.distributed.device
        if self.graph is not None and key != self.key:
            # another shape than the captured one: an eager step, the graph kept for the next.
            # The gradients of the last replay are still the parameters' (the graph's buffers):
            # let go of them, or backward would add to them.
            owner.optimizer.zero_grad(set_to_none=True)
            return PendingStep.settled(step, owner.eager_step(step, lr, owner.device_inputs(micro_batches)))
        if key != self.key:  # a first shape, or a new one before any capture: warm up for it
            self.key, self.warm_steps = key, 0
            self.inputs = [
                (
                    torch.empty_like(b.input_ids_BS, device=device),
                    torch.empty_like(b.labels_BS, device=device),
                )
                for b in micro_batches
            ]
        # queued behind the steps in flight, which read these buffers before the copies run
        for (ids, labels), batch in zip(self.inputs, micro_batches, strict=True):
            _load(ids, batch.input_ids_BS)
            _load(labels, batch.labels_BS)
        passes = len(micro_batches)
        if self.graph is None and self.warm_steps < WARMUP_STEPS:
            self.warm_steps += 1
            owner.optimizer.zero_grad(set_to_none=True)
            if self.warm_steps < WARMUP_STEPS:
                with self._on_stream():
                    return PendingStep.settled(step, owner.eager_step(step, lr, self.inputs))
            # the last warm-up runs what the capture will, with host reads refused
            with self._on_stream(), grouped_moe.device_counts_only():
                try:
                    with _host_reads_refused():
                        values, aux_kinds = owner.device_step(self.inputs, self.halted)
                except RuntimeError as error:
                    if "synchronizing CUDA operation" not in str(error):
                        raise
                    raise UpcycleError(
                        "train.cuda_graph: the training step waits for the host (the traceback shows "
                        "where), which a CUDA graph cannot replay; set cuda_graph: false"
                    ) from error
                result = self._read(step, lr, HostCopy(values), aux_kinds, passes)
            owner.optimizer.zero_grad(set_to_none=True)
            return PendingStep.settled(step, result)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.replays += 1
        # the values leave the graph's output buffer before the next replay overwrites it
        values, aux_kinds = HostCopy(self.values), self.aux_kinds
        pending = PendingStep(step, lambda: self._read(step, lr, values, aux_kinds, passes), owner.in_flight)
        owner.in_flight.append(pending)
        return pending

    def _read(self, step: int, lr: float, values: HostCopy, aux_kinds: list[str], passes: int):
        """Step 4 (`TrainStep`): the values on the host, then the non-finite decision (the
        update was already guarded on the device)."""
        try:
            result = self.owner.result(step, lr, values.tolist(), aux_kinds, passes)
            return self.owner.check_finite(result)
        except BaseException:
            if self.halted is not None:
                # the run stops here (a non-finite step, or the read itself failed): the replays
                # already queued, abandoned unread, kept the weights if the flag was set; queued
                # after them, the reset lets later steps (if the caller goes on) update again
                self.halted.zero_()
            raise

    @contextlib.contextmanager
    def _on_stream(self):
        """Run on the capture stream, ordered after (and before) the current stream's work."""
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)

    def _capture(self) -> None:
        owner = self.owner
        optimizer = owner.optimizer
        # gradients are then allocated inside the graph's pool, and written (not accumulated)
        # by every replay
        optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        stateful = set(optimizer.state)
        for group in optimizer.param_groups:
            group["capturable"] = True
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                values, aux_kinds = owner.device_step(self.inputs, self.halted)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            raise  # the trainer's advice on memory applies as it is
        except Exception as error:
            optimizer.zero_grad(set_to_none=True)
            raise UpcycleError(
                f"train.cuda_graph: the training step could not be captured as a CUDA graph "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                "set cuda_graph: false"
            ) from error
        finally:
            for group in optimizer.param_groups:
                group["capturable"] = False
        if set(optimizer.state) != stateful:
            # AdamW creates a parameter's state (zeroed moments) on its first gradient; created
            # inside the graph, every replay would zero it again
            optimizer.zero_grad(set_to_none=True)
            raise UpcycleError(
                "train.cuda_graph: a parameter got its first gradient only in the captured step, "
                "so its optimiser state would be reset by every replay; set cuda_graph: false"
            )
        self.graph, self.values, self.aux_kinds = graph, values, aux_kinds
        # the warm-up steps' activations sit in the ordinary pool, which the graph does not use
        torch.cuda.empty_cache()
