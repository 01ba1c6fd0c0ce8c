"""The trainer learns, and these checks can tell it from a broken trainer.

Three breakages are applied as monkeypatches, and each must FAIL the checks a working trainer
passes: labels not shifted (the model learns to copy its input: the training loss falls even
faster, but the held-out next-token loss, computed here independently of the trainer, stays
high), no optimizer step (nothing falls), and the aux loss dropped from the differentiated loss
(the logged loss equals the LM loss; and the step's gradient is not that of LM + aux).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train_helpers import MOE, SEQ_LEN, one_thread, prepared_data_fixture, train_config, train_records  # noqa: F401

import upcycle.train.step as step_module
from upcycle.checkpoint import load_model
from upcycle.data import TrainBatches, load_manifest
from upcycle.model import ModelConfig, Transformer
from upcycle.model.init import init_weights
from upcycle.train import TrainStep, WarmupCosine, train
from upcycle.train.distributed import Distributed
from upcycle.train.losses import LossParts, training_loss

STEPS = 50
# At initialisation the loss is about ln(320) = 5.77. A working trainer reaches ~4.1 held-out
# after 50 steps; with unshifted labels it stays near 5.0, without optimizer steps near 5.8.
HELDOUT_THRESHOLD = 4.5


def _unshifted_labels(batch, device):
    return batch.input_ids_BS.to(device), batch.input_ids_BS.to(device)


def _aux_not_differentiated(output, labels_BS, *cross_entropy):
    parts = training_loss(output, labels_BS, *cross_entropy)
    return LossParts(total=parts.lm, lm=parts.lm, aux_by_kind=parts.aux_by_kind)


BREAKAGES = {
    "labels_not_shifted": (lambda mp: mp.setattr(step_module, "model_inputs", _unshifted_labels), "held-out"),
    "no_optimizer_step": (
        lambda mp: mp.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None),
        "did not fall",
    ),
    "aux_loss_dropped": (lambda mp: mp.setattr(step_module, "training_loss", _aux_not_differentiated), "aux"),
}


def independent_heldout_loss(final_dir, data) -> float:
    """Next-token cross-entropy of the saved model on held-out text, shifted here, not by the trainer."""
    model = load_model(final_dir)
    manifest = load_manifest(data)
    losses = []
    for domain in sorted(manifest.domains):
        tokens = manifest.token_stream(domain, "heldout").read(0, 8 * (SEQ_LEN + 1))
        ids = torch.from_numpy(tokens.astype(np.int64)).view(8, SEQ_LEN + 1)
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits
        losses.append(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item())
    return sum(losses) / len(losses)


def assert_learned(output, data) -> None:
    records = train_records(output)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        aux = sum(r["aux_losses"].values())
        assert aux > 0 and r["loss"] == pytest.approx(r["lm_loss"] + aux, rel=1e-6, abs=0), (
            f"step {r['step']}: loss {r['loss']} is not lm_loss {r['lm_loss']} + aux {aux}"
        )
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 1.0, "the training loss did not fall"
    heldout = independent_heldout_loss(output / "final", data)
    assert heldout < HELDOUT_THRESHOLD, f"held-out loss {heldout:.3f} ≥ {HELDOUT_THRESHOLD}"


@pytest.mark.parametrize("breakage", [None, *BREAKAGES])
def test_loss_falls_below_a_threshold_that_broken_trainers_miss(
    breakage, prepared_data, tmp_path, monkeypatch
):
    if breakage is not None:
        BREAKAGES[breakage][0](monkeypatch)
    eval_at_end = {"every_steps": 0, "at_end": True, "max_sequences": 4}
    config = train_config(prepared_data, tmp_path / "out", stop={"max_steps": STEPS}, eval=eval_at_end)
    result = train(config, quiet=True)
    if breakage is not None:
        with pytest.raises(AssertionError, match=BREAKAGES[breakage][1]):
            assert_learned(tmp_path / "out", prepared_data)
        return
    assert_learned(tmp_path / "out", prepared_data)
    last = train_records(tmp_path / "out")[-1]
    assert set(last["expert_load"]) == {"0", "1"}
    assert all(len(s) == 4 and sum(s) == pytest.approx(1, abs=1e-3) for s in last["expert_load"].values())
    assert last["mfu"] is None and last["tokens"] == STEPS * 8 * SEQ_LEN
    assert set(result.eval) == {"code", "math"}
    for domain in result.eval.values():
        assert domain["tokens"] == 4 * SEQ_LEN
        assert domain["perplexity"] == pytest.approx(math.exp(domain["loss"]))


@pytest.mark.parametrize("breakage", [None, "aux_loss_dropped"])
def test_a_step_applies_the_gradient_of_lm_plus_aux_loss(breakage, prepared_data, monkeypatch):
    """With SGD at lr 1 the update is minus the gradient; it must be that of LM + aux loss."""
    if breakage is not None:
        BREAKAGES[breakage][0](monkeypatch)
    config = ModelConfig(**{**MOE, "moe": {**MOE["moe"], "aux_loss_coef": 1.0}})
    model = init_weights(Transformer(config), seed=0).train()
    batch = next(TrainBatches(load_manifest(prepared_data), SEQ_LEN, 4))
    routers = [p for name, p in model.named_parameters() if name.endswith("mlp.gate.weight")]

    out = model(batch.input_ids_BS)
    lm = F.cross_entropy(out.logits.flatten(0, 1), batch.labels_BS.flatten())
    with_aux = torch.autograd.grad(lm + sum(out.aux_losses.values()), routers, retain_graph=True)
    lm_only = torch.autograd.grad(lm, routers)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(with_aux, lm_only, strict=True))

    before = [p.detach().clone() for p in routers]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    step = TrainStep(
        model,
        optimizer,
        WarmupCosine(1.0, 0, 1, 1.0),
        Distributed(),
        clip_grad_norm=None,
        autocast_dtype=None,
    )
    step(1, [batch])
    applied = [b - p.detach() for b, p in zip(before, routers, strict=True)]
    matches = all(torch.allclose(a, g, atol=1e-6) for a, g in zip(applied, with_aux, strict=True))
    assert matches == (breakage is None)
