"""The training step's fast paths compute what the plain ones do (upcycle/train/step.py):

- clipping folded into a fused AdamW (`grad_scale`) against clip-then-step, with the norm above
  and below `clip_grad_norm`: the same weights after three steps within fp32 rounding;
- `compile_loss=True` (the cross-entropy under torch.compile) against the eager loss: the same
  loss and gradients;
- the fused AdamW order (optimiser step queued with a device-side `found_inf` before the values
  are read): a non-finite loss or gradient leaves weights, moments and step counts exactly as
  they were, with both policies, as the plain order does.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from test_train_helpers import LOSS_FAULTS

import upcycle.train.step as step_module
from upcycle.data import Batch
from upcycle.model import ModelConfig, Transformer
from upcycle.model.init import init_weights
from upcycle.train import NonFiniteLossError, TrainStep, WarmupCosine
from upcycle.train.distributed import Distributed
from upcycle.train.losses import LossParts, training_loss

CONFIG = ModelConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    moe={"num_experts": 4, "top_k": 2, "routing": "topk_softmax", "aux_loss": "switch", "aux_loss_coef": 0.01},
)  # fmt: skip


def batches(count: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, CONFIG.vocab_size, (2, 17), generator=generator)
        out.append(Batch(tokens[:, :-1], tokens[:, 1:], torch.zeros(2, dtype=torch.long)))
    return out


def make_step(fused: bool, clip: float | None, compile_loss: bool = False, nonfinite: str = "stop"):
    model = init_weights(Transformer(CONFIG), seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    return TrainStep(
        model, optimizer, WarmupCosine(1e-2, 0, 10**6, 1.0), Distributed(device=torch.device("cpu")),
        clip_grad_norm=clip, autocast_dtype=None, compile_loss=compile_loss, nonfinite_policy=nonfinite,
    )  # fmt: skip


def run(fused: bool, clip: float, compile_loss: bool = False, steps: int = 3):
    step = make_step(fused, clip, compile_loss)
    model = step.model
    results = [step(index + 1, [batch]) for index, batch in enumerate(batches(steps))]
    return step, model, results


@pytest.mark.parametrize("clip", [1e-3, 1e3], ids=["clipping", "not-clipping"])
def test_clipping_folded_into_fused_adamw_matches_clip_then_step(clip: float) -> None:
    folded_step, folded, folded_results = run(fused=True, clip=clip)
    plain_step, plain, plain_results = run(fused=False, clip=clip)
    assert folded_step.fold_clip and not plain_step.fold_clip
    assert not hasattr(folded_step.optimizer, "grad_scale")
    for a, b in zip(folded_results, plain_results, strict=True):
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    clipped = [r.grad_norm > clip for r in plain_results]
    assert all(clipped) if clip < 1 else not any(clipped)
    for (name, p), q in zip(folded.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # and the folded step really differs from not clipping at all when the norm is above the limit
    if clip < 1:
        _, unclipped, _ = run(fused=True, clip=1e9)
        assert any(
            not torch.allclose(p, q) for p, q in zip(folded.parameters(), unclipped.parameters(), strict=True)
        )


def test_compiled_loss_matches_the_eager_loss() -> None:
    torch._dynamo.reset()
    _, compiled, compiled_results = run(fused=False, clip=1.0, compile_loss=True, steps=2)
    _, eager, eager_results = run(fused=False, clip=1.0, steps=2)
    for a, b in zip(compiled_results, eager_results, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def snapshot(step: TrainStep) -> dict[str, torch.Tensor]:
    """Every parameter and every AdamW state tensor (moments, step counts), cloned."""
    out = {f"param:{name}": p.detach().clone() for name, p in step.model.named_parameters()}
    names = {id(p): name for name, p in step.model.named_parameters()}
    for p, state in step.optimizer.state.items():
        for key, value in state.items():
            out[f"{key}:{names[id(p)]}"] = torch.as_tensor(value).clone()
    return out


@pytest.mark.parametrize("at", [1, 2], ids=["first-step", "second-step"])
@pytest.mark.parametrize("clip", [1.0, None], ids=["clip", "no-clip"])
@pytest.mark.parametrize("fault", sorted(LOSS_FAULTS))
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_fused_order_leaves_everything_untouched_on_a_non_finite_step(policy, fault, clip, at, monkeypatch):
    calls = []

    def faulty_loss(output, labels_BS, *cross_entropy):
        calls.append(None)
        parts = training_loss(output, labels_BS, *cross_entropy)
        if len(calls) == at:
            return LossParts(LOSS_FAULTS[fault](parts.total), parts.lm, parts.aux_by_kind)
        return parts

    monkeypatch.setattr(step_module, "training_loss", faulty_loss)
    fused, plain = make_step(True, clip, nonfinite=policy), make_step(False, clip, nonfinite=policy)
    assert fused.fold_clip and not plain.fold_clip
    data = batches(3)
    if at == 2:
        fused(1, [data[0]])
    before = snapshot(fused)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match=rf"^step {at}: .*weights are those of step {at - 1}"):
            fused(at, [data[at - 1]])
    else:
        assert fused(at, [data[at - 1]]).skipped
    after = snapshot(fused)
    assert len(fused.optimizer.state) == (0 if at == 1 else len(list(fused.model.parameters())))
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert all(p.grad is None for p in fused.model.parameters())
    assert not hasattr(fused.optimizer, "found_inf") and not hasattr(fused.optimizer, "grad_scale")
    if policy == "skip":  # and the run goes on as the plain order's does
        for index in range(at + 1, 4):
            fused(index, [data[index - 1]])
        calls.clear()
        plain_results = [plain(index, [data[index - 1]]) for index in range(1, 4)]
        assert [r.skipped for r in plain_results] == [index == at for index in range(1, 4)]
        for p, q in zip(fused.model.parameters(), plain.model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_batches_reach_the_gpu_through_page_locked_memory() -> None:
    """Pageable host batches are copied through page-locked memory (no wait for the GPU) and
    arrive intact, also when the host buffer is overwritten right after the copy is queued."""
    device = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=device)
    source = batches(1)[0]
    expected = (source.input_ids_BS.clone(), source.labels_BS.clone())
    for _ in range(20):
        busy = busy @ busy / 64  # keep the stream busy while the copies are queued
    ids, labels = step_module.model_inputs(source, device)
    source.input_ids_BS.fill_(-1)
    source.labels_BS.fill_(-1)
    assert ids.device.type == labels.device.type == "cuda"
    assert torch.equal(ids.cpu(), expected[0]) and torch.equal(labels.cpu(), expected[1])
