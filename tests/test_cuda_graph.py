"""`train.cuda_graph` (upcycle/train/cuda_graph.py): the whole step replayed as one CUDA graph.

On the CPU: the refusals (no CUDA device, several processes, no fused AdamW, eager experts, no
native grouped GEMM for the compute dtype), each one sentence with the fix, raised before `train`
writes anything; and `StepGraph`'s order of work with its CUDA calls recorded (warm-up, one
capture, replays, the eager fallback without the last replay's gradients, a new shape warmed up
before its capture, capture failures, a warm-up step that reads the host, the learning rate a
tensor during a step and the float after it); removing any of these behaviours fails them.

On a GPU (gpu marker, run by bench/gpu_tests.sh): a tiny bf16-weights MoE trained with replayed
steps against the same model trained eagerly, both with the weight gradients on
`torch._grouped_mm` (what a captured step uses), attention on the math backend (cuDNN's backward
adds with atomics) and the learning rate exact in fp32 (so the eager run's float is the graph's
tensor value): every step's loss, norm and expert loads, then weights, moments and step counts,
bit for bit, with a batch of another shape in between (an eager step), and the same with
compiled blocks (each run compiling afresh, one shape). A non-finite step inside
the graph skipped, weights and optimiser state untouched, under both policies; and `train` with
`cuda_graph: true` against `train` without.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
from test_train_helpers import DENSE, prepared_data_fixture, train_config, train_records  # noqa: F401

from upcycle.data import Batch
from upcycle.errors import UpcycleError
from upcycle.kernels import grouped_moe
from upcycle.model import ModelConfig, Transformer
from upcycle.model.init import init_weights
from upcycle.train import NonFiniteLossError, TrainStep, WarmupCosine, cuda_graph, train
from upcycle.train.build import cast_to_bf16_weights, compile_blocks
from upcycle.train.config import OptimizerConfig
from upcycle.train.cuda_graph import WARMUP_STEPS, check_supported
from upcycle.train.distributed import Distributed
from upcycle.train.optim import build_optimizer

CONFIG = ModelConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
    moe={"num_experts": 4, "top_k": 2, "routing": "topk_softmax", "aux_loss": "switch", "aux_loss_coef": 0.01},
)  # fmt: skip
LR = 2.0**-10  # exact in fp32: the tensor learning rate of a graphed step is then the float itself


def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def test_refusals_name_the_fix(monkeypatch) -> None:
    grouped = Transformer(CONFIG)
    eager = Transformer(
        CONFIG.model_copy(update={"moe": CONFIG.moe.model_copy(update={"implementation": "eager"})})
    )
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    cases = [
        (torch.device("cpu"), 1, True, grouped, bf16, "needs a CUDA device; set cuda_graph: false"),
        (cuda, 2, True, grouped, bf16, "one GPU in one process; set cuda_graph: false"),
        (cuda, 1, False, grouped, bf16, "needs the fused AdamW"),
        (cuda, 1, True, eager, bf16, "set moe.implementation: auto or grouped, or cuda_graph: false"),
        # fp32 compute: no native grouped GEMM on any GPU, so the experts would read counts
        (cuda, 1, True, grouped, torch.float32, "float32 compute do not give .* or cuda_graph: false"),
    ]
    for device, world_size, fused, model, dtype, message in cases:
        with pytest.raises(UpcycleError, match=message):
            check_supported(device, world_size, fused, model, dtype)
    # what it serves: bf16 on a GPU with native grouped GEMMs (simulated here)
    seen = []
    monkeypatch.setattr(grouped_moe, "grouped_mm_available", lambda *a: seen.append(a) or True)
    check_supported(cuda, 1, True, grouped, bf16)
    assert seen == [(cuda, bf16, (CONFIG.hidden_size, CONFIG.intermediate_size))] * CONFIG.num_hidden_layers
    monkeypatch.setattr(grouped_moe, "grouped_mm_available", lambda *a: False)
    with pytest.raises(UpcycleError, match=r"bf16 on compute capability 9\.x or 10\.x"):
        check_supported(cuda, 1, True, grouped, bf16)


def test_train_refuses_cuda_graph_on_the_cpu_before_writing(prepared_data, tmp_path) -> None:
    config = train_config(prepared_data, tmp_path / "out", cuda_graph=True)
    with pytest.raises(UpcycleError, match=r"train\.cuda_graph needs a CUDA device") as error:
        train(config, quiet=True)
    assert error.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def _batches(count: int, seq_len: int = 64, seed: int = 0) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, CONFIG.vocab_size, (4, seq_len + 1), generator=generator)
        out.append(Batch(tokens[:, :-1], tokens[:, 1:], torch.zeros(4, dtype=torch.long)))
    return out


def _step(graphed: bool, compiled: bool = False, nonfinite: str = "stop") -> TrainStep:
    device = torch.device("cuda")
    model = init_weights(Transformer(CONFIG), seed=0).to(device).train()
    cast_to_bf16_weights(model)
    if compiled:
        compile_blocks(model)
    return TrainStep(
        model, build_optimizer(model, OptimizerConfig(lr=LR, weight_decay=0.1), device),
        WarmupCosine(LR, 0, 10**9, 1.0), Distributed(device=device),
        clip_grad_norm=1.0, autocast_dtype=torch.bfloat16, compile_loss=compiled,
        nonfinite_policy=nonfinite, cuda_graph=graphed,
    )  # fmt: skip


def _state(step: TrainStep) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in step.model.parameters()]
    for p in step.model.parameters():
        state = step.optimizer.state.get(p, {})
        tensors += [state[k].clone() for k in ("exp_avg", "exp_avg_sq", "step") if k in state]
    return tensors


@pytest.fixture
def deterministic(monkeypatch):
    """Both runs on `torch._grouped_mm` weight gradients, the math attention backend and torch's
    deterministic algorithms (any kernel with an atomic-add form takes its deterministic one)."""
    monkeypatch.setattr(grouped_moe, "WGRAD_LOOP_MAX_EXPERTS", 0)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _order() -> list[Batch]:
    data = _batches(7)
    short = _batches(1, seq_len=32, seed=1)[0]
    return [*data[:5], short, *data[5:]]  # a batch of another shape after the capture: eager


@needs_gpu
@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("launched", [False, True], ids=["read-each", "launched-then-read"])
def test_replayed_steps_match_eager_steps_bit_for_bit(launched: bool) -> None:
    """`launched`: every step launched before any is read (`TrainStep.launch`), the replays
    queued back to back, the short batch's eager step reading those before it."""
    order = _order()
    graphed, eager = _step(True), _step(False)
    if launched:
        pending = [graphed.launch(index + 1, [batch]) for index, batch in enumerate(order)]
        ours = [p.result() for p in pending]
    else:
        ours = [graphed(index + 1, [batch]) for index, batch in enumerate(order)]
    theirs = [eager(index + 1, [batch]) for index, batch in enumerate(order)]
    # steps 1-2 warm up, 3 is captured and replayed, 4-5 and 7-8 replay, 6 (short) runs eagerly
    assert graphed.graph.replays == len(order) - WARMUP_STEPS - 1
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        got, expected = (
            (a.loss, a.grad_norm, a.aux_losses, a.expert_load),
            (b.loss, b.grad_norm, b.aux_losses, b.expert_load),
        )
        assert got == expected, f"step {index + 1}: {got} != {expected}"
        assert not a.skipped and math.isfinite(a.loss)
    assert ours[-1].loss < ours[0].loss
    for index, (x, y) in enumerate(zip(_state(graphed), _state(eager), strict=True)):
        assert torch.equal(x, y), (index, tuple(x.shape), (x.float() - y.float()).abs().max().item())


@needs_gpu
@pytest.mark.usefixtures("deterministic")
def test_replayed_compiled_blocks_match_eager_compiled_blocks_bit_for_bit() -> None:
    """The same with torch.compile'd blocks, each run compiling afresh and all batches of one
    shape: compiled code is shared by every model in a process, and a batch of another shape
    recompiles it with dynamic shapes, which later eager steps then run while a graph replays the
    static code it captured (run T, H100: the graphed run 1e-4 off the eager ones by step 6,
    which agreed with each other bit for bit, when they ran on the other run's recompiled code)."""
    order = _batches(7)
    runs = []
    for graphed in (True, False):
        torch._dynamo.reset()
        step = _step(graphed, compiled=True)
        runs.append((step, [step(index + 1, [batch]) for index, batch in enumerate(order)]))
    (graphed, ours), (eager, theirs) = runs
    assert graphed.graph.replays == len(order) - WARMUP_STEPS
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        got, expected = (a.loss, a.grad_norm, a.expert_load), (b.loss, b.grad_norm, b.expert_load)
        assert got == expected, f"step {index + 1}: {got} != {expected}"
    for index, (x, y) in enumerate(zip(_state(graphed), _state(eager), strict=True)):
        assert torch.equal(x, y), (index, tuple(x.shape))


@needs_gpu
def test_a_nonfinite_replayed_step_changes_nothing() -> None:
    for policy in ("skip", "stop"):
        step = _step(True, nonfinite=policy)
        data = _batches(5)
        for index in range(WARMUP_STEPS + 1):
            step(index + 1, [data[index]])
        assert step.graph.graph is not None
        with torch.no_grad():  # in place: the graph reads the same storage
            step.model.model.embed_tokens.weight[data[3].input_ids_BS[0, 0]] = float("inf")
        before = _state(step)
        if policy == "stop":
            with pytest.raises(NonFiniteLossError, match="step 4"):
                step(4, [data[3]])
        else:
            assert step(4, [data[3]]).skipped
        after = _state(step)
        assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True) if not x.isinf().any())
        assert all(torch.equal(x.isinf(), y.isinf()) for x, y in zip(before, after, strict=True))


@needs_gpu
def test_a_replay_launched_behind_a_nonfinite_step_changes_nothing_under_stop() -> None:
    """Stop policy, steps launched before they are read: step 4 is non-finite and step 5 was
    queued behind it before the host read step 4. Neither changes weights or optimiser state
    (step 5 sees the device's `halted` flag); step 5 has no result; a step after that updates
    again."""
    step = _step(True, nonfinite="stop")
    data = _batches(6)
    for index in range(WARMUP_STEPS + 1):
        step(index + 1, [data[index]])
    token = data[3].input_ids_BS[0, 0]
    # step 5's own batch is finite: only the flag can keep it from updating
    assert not (data[5].input_ids_BS == token).any()
    embedding = step.model.model.embed_tokens.weight
    row = embedding[token].detach().clone()
    with torch.no_grad():
        embedding[token] = float("inf")
    before = _state(step)
    step.launch(4, [data[3]])
    fifth = step.launch(5, [data[5]])
    with pytest.raises(NonFiniteLossError, match="step 4"):
        fifth.result()
    with pytest.raises(UpcycleError, match="step 5 was launched before step 4"):
        fifth.result()
    after = _state(step)
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True) if not x.isinf().any())
    assert all(torch.equal(x.isinf(), y.isinf()) for x, y in zip(before, after, strict=True))
    with torch.no_grad():
        embedding[token] = row
    counts = [float(state["step"]) for state in step.optimizer.state.values()]
    result = step(6, [data[4]])
    assert math.isfinite(result.loss) and not result.skipped
    # the step after the stopped one updates again (AdamW's step counts: a bf16 weight can keep
    # its value through a small update)
    assert [float(state["step"]) for state in step.optimizer.state.values()] == [c + 1 for c in counts]


@needs_gpu
def test_train_with_cuda_graph(prepared_data, tmp_path) -> None:
    """The trainer's graphed run follows its eager run (learning rates rounded to fp32 and the
    weight gradients on another kernel: close, not bit for bit)."""
    runs = {}
    for graphed in (False, True):
        config = train_config(
            prepared_data, tmp_path / str(graphed), {**DENSE, "moe": {"num_experts": 4, "top_k": 2}},
            stop={"max_steps": 6}, cuda_graph=graphed, compile=True,
        )  # fmt: skip
        train(config, quiet=True)
        runs[graphed] = [r["loss"] for r in train_records(tmp_path / str(graphed))]
    assert len(runs[True]) == 6 and all(math.isfinite(v) for v in runs[True])
    assert runs[True] == pytest.approx(runs[False], rel=2e-2)


class _FakeCuda:
    """The CUDA calls of `StepGraph`, recorded on the CPU: streams, the graph and its capture,
    the sync check. `capturing` is True inside a capture."""

    def __init__(self, monkeypatch) -> None:
        self.log: list[tuple] = []
        self.capturing = False
        self.sync_mode = 0
        fake = self

        class Stream:
            device = torch.device("cpu")

            def wait_stream(self, other) -> None:
                fake.log.append(("wait",))

        class Graph:
            def replay(self) -> None:
                fake.log.append(("replay",))

        @contextlib.contextmanager
        def capture(graph, stream=None):
            self.capturing = True
            try:
                yield
            finally:
                self.capturing = False

        def set_mode(mode) -> None:
            self.sync_mode = mode

        for name, value in {
            "Stream": lambda device=None: Stream(),
            "current_stream": lambda device=None: Stream(),
            "stream": lambda stream: contextlib.nullcontext(),
            "CUDAGraph": Graph,
            "graph": capture,
            "empty_cache": lambda: None,
            "get_sync_debug_mode": lambda: self.sync_mode,
            "set_sync_debug_mode": set_mode,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(cuda_graph, "_load", lambda static, source: static.copy_(source))
        monkeypatch.setattr(cuda_graph, "HostCopy", lambda t: SimpleNamespace(tolist=t.tolist))


class _FakeOwner:
    """What `StepGraph` calls on its `TrainStep`, recording each call and what it saw."""

    def __init__(self, fake: _FakeCuda) -> None:
        self.fake = fake
        self.distributed = SimpleNamespace(device=torch.device("cpu"))
        self.param = torch.nn.Parameter(torch.zeros(3))
        self.optimizer = torch.optim.AdamW([self.param], lr=1.0)
        self.fail_capture: Exception | None = None
        self.new_state_in_capture = False
        self.nonfinite_policy = "stop"
        self.in_flight: list = []
        self.nonfinite_steps: set[int] = set()  # check_finite raises for these

    def drain(self) -> None:
        self.fake.log.append(("drain", [p.step for p in self.in_flight]))
        if self.in_flight:
            self.in_flight[-1].result()

    def _seen(self) -> dict:
        group = self.optimizer.param_groups[0]
        return {
            "lr": float(group["lr"]) if isinstance(group["lr"], torch.Tensor) else None,
            "capturable": group["capturable"],
            "host counts off": grouped_moe._device_counts_only > 0,
            "sync check": self.fake.sync_mode,
        }

    def device_inputs(self, micro_batches):
        return [(b.input_ids_BS, b.labels_BS) for b in micro_batches]

    def eager_step(self, step, lr, inputs):
        self.fake.log.append(
            ("eager", step, tuple(inputs[0][0].shape), self.param.grad is None, self._seen())
        )
        self.param.grad = torch.ones(3)  # what a backward leaves
        return SimpleNamespace(step=step)

    def device_step(self, inputs, halted):
        assert halted is not None and halted.shape == ()
        kind = "capture" if self.fake.capturing else "warm"
        self.fake.log.append((kind, tuple(inputs[0][0].shape), self.param.grad is None, self._seen()))
        if self.fake.capturing and self.fail_capture is not None:
            raise self.fail_capture
        if self.fake.capturing and self.new_state_in_capture:
            self.optimizer.state[torch.nn.Parameter(torch.zeros(1))] = {}
        self.param.grad = torch.ones(3)
        return torch.tensor([1.0, 2.0]), []

    def result(self, step, lr, values, aux_kinds, passes):
        self.fake.log.append(("read", step))
        return SimpleNamespace(step=step, values=values)

    def check_finite(self, result):
        if result.step in self.nonfinite_steps:
            raise NonFiniteLossError(f"step {result.step}: not finite")
        return result


def _batch(seq_len: int) -> Batch:
    tokens = torch.zeros(2, seq_len, dtype=torch.long)
    return Batch(tokens, tokens, torch.zeros(2, dtype=torch.long))


def test_step_graph_warms_up_captures_once_replays_and_falls_back(monkeypatch) -> None:
    """StepGraph's order of work on the CPU, CUDA calls recorded: two warm-up steps (the second
    with host counts off and the sync check raising), one capture then replays, a batch of
    another shape run eagerly without the last replay's gradients, the learning rate a tensor
    during the step and the float after it, the graph dropped on load_state_dict."""
    fake = _FakeCuda(monkeypatch)
    owner = _FakeOwner(fake)
    graph = cuda_graph.StepGraph(owner)
    for step, seq_len in enumerate([64, 64, 64, 32, 64], start=1):
        graph(step, 0.25 * step, [_batch(seq_len)])
        rate = owner.optimizer.param_groups[0]["lr"]
        assert type(rate) is float and rate == 0.25 * step  # the float, for checkpoints
    work = [entry[:3] for entry in fake.log if entry[0] not in ("wait", "drain", "read")]
    assert work == [
        ("eager", 1, (2, 64)),
        ("warm", (2, 64), True),
        ("capture", (2, 64), True),
        ("replay",),
        ("eager", 4, (2, 32)),
        ("replay",),
    ]
    seen = {
        entry[0] + str(entry[1]): entry[-1] for entry in fake.log if entry[0] in ("eager", "warm", "capture")
    }
    assert seen["eager1"] == {"lr": 0.25, "capturable": False, "host counts off": False, "sync check": 0}
    assert seen["warm(2, 64)"] == {
        "lr": 0.5,
        "capturable": False,
        "host counts off": True,
        "sync check": "error",
    }
    assert seen["capture(2, 64)"]["capturable"] and seen["capture(2, 64)"]["lr"] == 0.75
    assert seen["eager4"]["lr"] == 1.0
    eager4 = next(entry for entry in fake.log if entry[:2] == ("eager", 4))
    assert eager4[3], "the eager step must start without the replay's gradients"
    assert graph.replays == 2 and not owner.optimizer.param_groups[0]["capturable"] and fake.sync_mode == 0
    owner.optimizer.load_state_dict(owner.optimizer.state_dict())
    assert graph.graph is None and graph.warm_steps == 0


def test_step_graph_warms_a_new_shape_up_before_capturing_it(monkeypatch) -> None:
    fake = _FakeCuda(monkeypatch)
    graph = cuda_graph.StepGraph(_FakeOwner(fake))
    for step, seq_len in enumerate([64, 32, 32, 32], start=1):
        graph(step, 0.1, [_batch(seq_len)])
    work = [entry[:2] for entry in fake.log if entry[0] not in ("wait", "drain", "read")]
    assert work == [("eager", 1), ("eager", 2), ("warm", (2, 32)), ("capture", (2, 32)), ("replay",)]


@pytest.mark.parametrize("failure", ["error", "out of memory", "state"])
def test_step_graph_capture_failures(monkeypatch, failure: str) -> None:
    fake = _FakeCuda(monkeypatch)
    owner = _FakeOwner(fake)
    graph = cuda_graph.StepGraph(owner)
    if failure == "error":
        owner.fail_capture = RuntimeError("operation not permitted when stream is capturing")
    elif failure == "out of memory":
        owner.fail_capture = torch.OutOfMemoryError("CUDA out of memory")
    else:
        owner.new_state_in_capture = True
    for step in (1, 2):
        graph(step, 0.1, [_batch(8)])
    expected = {
        "error": (UpcycleError, "could not be captured as a CUDA graph .*operation not permitted"),
        "out of memory": (torch.OutOfMemoryError, "CUDA out of memory"),
        "state": (UpcycleError, "its optimiser state would be reset by every replay"),
    }[failure]
    with pytest.raises(expected[0], match=expected[1]):
        graph(3, 0.1, [_batch(8)])
    assert graph.graph is None and owner.param.grad is None
    group = owner.optimizer.param_groups[0]
    assert not group["capturable"] and type(group["lr"]) is float and group["lr"] == 0.1


def test_step_graph_warm_up_refuses_a_step_that_reads_the_host(monkeypatch) -> None:
    fake = _FakeCuda(monkeypatch)
    owner = _FakeOwner(fake)

    def reads_the_host(inputs, halted):
        assert fake.sync_mode == "error"
        raise RuntimeError("called a synchronizing CUDA operation")

    graph = cuda_graph.StepGraph(owner)
    graph(1, 0.1, [_batch(8)])
    owner.device_step = reads_the_host
    with pytest.raises(UpcycleError, match=r"waits for the host .* set cuda_graph: false"):
        graph(2, 0.1, [_batch(8)])
    assert fake.sync_mode == 0 and grouped_moe._device_counts_only == 0


def test_step_graph_launches_replays_without_reading_them(monkeypatch) -> None:
    """A replay returns unread (`launch`); results are read in launch order; an eager step (a
    batch of another shape) reads the replays in flight before it runs."""
    fake = _FakeCuda(monkeypatch)
    owner = _FakeOwner(fake)
    graph = cuda_graph.StepGraph(owner)
    for step in (1, 2, 3):  # warm-up, warm-up, capture + first replay
        graph(step, 0.1, [_batch(8)])
    del fake.log[:]
    fourth = graph.launch(4, 0.1, [_batch(8)])
    fifth = graph.launch(5, 0.1, [_batch(8)])
    assert [e[0] for e in fake.log if e[0] != "wait"] == ["replay", "replay"]
    assert not fourth.done and owner.in_flight == [fourth, fifth]
    assert fifth.result().step == 5
    assert [e for e in fake.log if e[0] == "read"] == [("read", 4), ("read", 5)]
    sixth = graph.launch(6, 0.1, [_batch(8)])
    del fake.log[:]
    graph.launch(7, 0.1, [_batch(4)])  # another shape: eager, after reading step 6
    work = [e[:2] for e in fake.log if e[0] != "wait"]
    assert work == [("drain", [6]), ("read", 6), ("eager", 7)] and sixth.done


def test_step_graph_stop_policy_halts_the_replays_queued_behind_a_nonfinite_step(monkeypatch) -> None:
    """Stop policy: the step read as non-finite raises, a replay launched after it is abandoned
    (its update was skipped on the device by the `halted` flag, which the captured step sets),
    and the flag is cleared for any later step."""
    fake = _FakeCuda(monkeypatch)
    owner = _FakeOwner(fake)
    graph = cuda_graph.StepGraph(owner)
    for step in (1, 2, 3):
        graph(step, 0.1, [_batch(8)])
    owner.nonfinite_steps = {4}
    graph.launch(4, 0.1, [_batch(8)])
    fifth = graph.launch(5, 0.1, [_batch(8)])
    graph.halted.fill_(1.0)  # what step 4's replay does on the device
    with pytest.raises(NonFiniteLossError, match="step 4"):
        fifth.result()
    assert float(graph.halted) == 0.0 and owner.in_flight == []
    with pytest.raises(UpcycleError, match="step 5 was launched before step 4 ended the run with an error"):
        fifth.result()
    assert graph(6, 0.1, [_batch(8)]).step == 6  # the caller may go on: the next step is read


def test_step_graph_skip_policy_has_no_halt_flag(monkeypatch) -> None:
    fake = _FakeCuda(monkeypatch)
    owner = _FakeOwner(fake)
    owner.nonfinite_policy = "skip"
    graph = cuda_graph.StepGraph(owner)
    assert graph.halted is None
    owner.device_step = lambda inputs, halted: (
        fake.log.append(("halted", halted)) or (torch.tensor([1.0, 2.0]), [])
    )
    graph(1, 0.1, [_batch(8)])
    graph(2, 0.1, [_batch(8)])
    assert ("halted", None) in fake.log


def _cpu_step() -> TrainStep:
    """The step on the CPU with torch's fused AdamW (it runs there), stop policy."""
    model = init_weights(Transformer(CONFIG), seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, fused=True)
    return TrainStep(
        model, optimizer, WarmupCosine(LR, 0, 10**9, 1.0), Distributed(device=torch.device("cpu")),
        clip_grad_norm=1.0, autocast_dtype=None, nonfinite_policy="stop",
    )  # fmt: skip


@pytest.mark.parametrize("flag", [True, False], ids=["halted", "no-flag"])
def test_device_step_halted_flag_skips_every_later_update(flag: bool) -> None:
    """`TrainStep.device_step` (what the graph captures), run directly on the CPU: a non-finite
    step sets `halted`, and a finite step after it then changes no weight or moment. Without
    the flag the same finite step does update (the control: the flag is what stops it)."""
    step, data = _cpu_step(), _batches(6)
    for index in range(3):
        step(index + 1, [data[index]])
    token = data[3].input_ids_BS[0, 0]
    assert not (data[5].input_ids_BS == token).any()
    with torch.no_grad():
        step.model.model.embed_tokens.weight[token] = float("inf")
    halted = torch.zeros(()) if flag else None
    before = _state(step)

    def device_step(batch: Batch) -> torch.Tensor:
        step.optimizer.zero_grad(set_to_none=True)
        return step.device_step(step.device_inputs([batch]), halted)[0]

    assert not torch.isfinite(device_step(data[3])[0])
    if flag:
        assert float(halted) == 1.0
    assert torch.isfinite(device_step(data[5])[0])
    after = _state(step)
    unchanged = [torch.equal(x, y) for x, y in zip(before, after, strict=True) if not x.isinf().any()]
    assert all(unchanged) == flag
    if flag:
        assert float(halted) == 1.0  # kept until the host clears it
