"""Faults: a non-finite loss or gradient norm stops before the optimizer step (weights unchanged,
the step named), 1.5 does not; the skip policy; config refusals through the CLI (exit code 2,
one sentence); CUDA out-of-memory advice."""

from __future__ import annotations

import pytest
import torch
import yaml
from cli_helpers import assert_refused, run_cli
from safetensors.torch import load_file
from test_train_helpers import (  # noqa: F401
    DENSE,
    LOSS_FAULTS,
    one_thread,
    prepared_data_fixture,
    train_config,
    train_records,
)

import upcycle.train.step as step_module
from upcycle.checkpoint import save_native
from upcycle.data.synthetic import synthetic_documents, train_byte_level_bpe
from upcycle.model import ModelConfig, Transformer
from upcycle.model.init import init_weights
from upcycle.train import NonFiniteLossError, Trainer, TrainStep
from upcycle.train.losses import LossParts, training_loss

INJECT_AT_STEP = 3


INJECTIONS = {
    **LOSS_FAULTS,
    "1.5": lambda total: total - total.detach() + 1.5,  # the value 1.5, the same gradient
}


def inject(monkeypatch, kind: str, at_steps=(INJECT_AT_STEP,), micro_batches: int = 2) -> None:
    """Change the loss of every micro-batch of the given steps (calls are counted)."""
    calls = []

    def loss_with_fault(output, labels_BS, *cross_entropy):
        calls.append(None)
        parts = training_loss(output, labels_BS, *cross_entropy)
        step = (len(calls) - 1) // micro_batches + 1
        if at_steps == "all" or step in at_steps:
            return LossParts(INJECTIONS[kind](parts.total), parts.lm, parts.aux_by_kind)
        return parts

    monkeypatch.setattr(step_module, "training_loss", loss_with_fault)


def _every_step_checkpointed(data, output, **overrides) -> dict:
    return train_config(
        data, output, stop={"max_steps": 5}, checkpoint={"every_steps": 1, "keep_last_k": None}, **overrides
    )


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan", "the loss is nan"),
        ("inf", "the loss is inf"),
        ("nan_gradient", r"the loss is [0-9.]+ and the gradient norm nan"),
    ],
)
def test_non_finite_stops_before_the_optimizer_step(kind, message, prepared_data, tmp_path, monkeypatch):
    inject(monkeypatch, kind)
    trainer = Trainer(TrainConfigFrom(_every_step_checkpointed(prepared_data, tmp_path / "out")), quiet=True)
    with pytest.raises(NonFiniteLossError, match=f"^step {INJECT_AT_STEP}: {message}") as caught:
        trainer.run()
    assert "weights are those of step 2" in str(caught.value)
    after_step_2 = load_file(
        tmp_path / "out" / "checkpoints" / "step-00000002" / "model" / "model.safetensors"
    )
    live = trainer.model.state_dict()
    assert all(torch.equal(live[name], tensor) for name, tensor in after_step_2.items())
    optimizer = trainer.train_step.optimizer
    assert {int(s["step"]) for s in optimizer.state.values()} == {2}  # no third AdamW update
    assert [r["step"] for r in train_records(tmp_path / "out")] == [1, 2]


def test_a_loss_of_one_and_a_half_does_not_stop(prepared_data, tmp_path, monkeypatch):
    inject(monkeypatch, "1.5")
    trainer = Trainer(TrainConfigFrom(_every_step_checkpointed(prepared_data, tmp_path / "out")), quiet=True)
    result = trainer.run()
    assert result.steps == 5
    records = train_records(tmp_path / "out")
    assert records[INJECT_AT_STEP - 1]["loss"] == 1.5
    assert [r["skipped"] for r in records] == [False] * 5


def test_non_finite_through_the_cli_names_the_step(prepared_data, tmp_path, monkeypatch):
    inject(monkeypatch, "nan")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(train_config(prepared_data, tmp_path / "out")))
    result = run_cli("train", path, "--quiet")
    assert result.returncode == 3
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert f"upcycle: error: step {INJECT_AT_STEP}: the loss is nan" in result.stderr


def test_skip_policy_drops_the_update_and_gives_up_after_a_streak(prepared_data, tmp_path, monkeypatch):
    inject(monkeypatch, "nan")
    skip = {"policy": "skip", "max_consecutive_skips": 2}
    result = Trainer(
        TrainConfigFrom(_every_step_checkpointed(prepared_data, tmp_path / "out", nonfinite=skip)), quiet=True
    ).run()
    assert result.steps == 5
    records = train_records(tmp_path / "out")
    assert [r["skipped"] for r in records] == [False, False, True, False, False]
    assert records[2]["loss"] is None  # non-finite values are written as null
    checkpoints = tmp_path / "out" / "checkpoints"
    before, after = (
        load_file(checkpoints / f"step-0000000{s}" / "model" / "model.safetensors") for s in (2, 3)
    )
    assert all(torch.equal(before[k], after[k]) for k in before)

    inject(monkeypatch, "nan", at_steps="all")
    with pytest.raises(NonFiniteLossError, match="step 2: 2 steps in a row"):
        Trainer(
            TrainConfigFrom(train_config(prepared_data, tmp_path / "again", nonfinite=skip)), quiet=True
        ).run()


def TrainConfigFrom(data: dict):
    from upcycle.train import TrainConfig

    return TrainConfig.model_validate(data)


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory):
    """A dense model folder whose tokenizer differs from the data's (same vocabulary size)."""
    root = tmp_path_factory.mktemp("other")
    tokenizer = train_byte_level_bpe(synthetic_documents(50, seed=99), 320, root / "tokenizer")
    model = init_weights(Transformer(ModelConfig(**DENSE)), seed=0)
    return save_native(model, root / "model", tokenizer_from=tokenizer)


def _refusal(tmp_path, config: dict, *fragments: str, before_any_output: bool = True) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert_refused(run_cli("train", path, "--quiet"), *fragments)
    assert (tmp_path / "out").exists() != before_any_output


def test_refusals(prepared_data, tmp_path, other_tokenizer_model):
    base = train_config(prepared_data, tmp_path / "out")
    _refusal(
        tmp_path, {**base, "checkpoint": {"keep_last_k": 1}}, "checkpoint: keep_last_k 1", "use 2 or more"
    )
    _refusal(tmp_path, {**base, "learning_rate": 1e-3}, "learning_rate", "unknown key")
    _refusal(tmp_path, {**base, "optimizer": {"lr": 1e-3, "beta": 0.9}}, "optimizer.beta", "unknown key")
    missing = {**base, "data": {"path": str(tmp_path / "nowhere"), "seq_len": 32}}
    _refusal(tmp_path, missing, "nowhere does not exist", "upcycle data prepare")
    mismatch = {**base, "model": {"path": str(other_tokenizer_model)}}
    _refusal(
        tmp_path, mismatch, "was tokenized with tokenizer", "re-run prepare_data with the model's tokenizer"
    )
    small_vocab = {**base, "model": {"config": {**DENSE, "vocab_size": 100}}}
    _refusal(tmp_path, small_vocab, "vocab_size is 100")
    _refusal(tmp_path, {**base, "stop": {"max_steps": 5, "max_tokens": 100}}, "exactly one of max_steps")
    _refusal(tmp_path, {**base, "batch": {"global_batch_size": 8, "micro_batch_size": 3}}, "micro_batch_size")
    dense_routers = {**base, "model": {"config": DENSE}, "freeze": "all_but_routers"}
    _refusal(tmp_path, dense_routers, "all_but_routers leaves nothing to train")
    weights = {**base, "data": {**base["data"], "weights": {"poetry": 1.0}}}
    _refusal(tmp_path, weights, "unknown domains ['poetry']")


def test_cuda_out_of_memory_suggests_a_smaller_micro_batch(prepared_data, tmp_path, monkeypatch):
    def out_of_memory(self, step, micro_batches):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TrainStep, "launch", out_of_memory)
    config = train_config(prepared_data, tmp_path / "out")
    _refusal(tmp_path, config, "at step 1", "micro_batch_size: 2", before_any_output=False)


def test_out_of_memory_advice_names_cuda_graph_when_it_is_on():
    from types import SimpleNamespace

    for micro, graph in ((4, True), (1, True), (4, False)):
        state = SimpleNamespace(
            plan=SimpleNamespace(micro_batch_size=micro),
            _training=True,
            counters=SimpleNamespace(step=2),
            config=SimpleNamespace(cuda_graph=graph),
        )
        advice = Trainer._out_of_memory_advice(state)
        assert "at step 3" in advice
        assert ("cuda_graph: false" in advice) == graph, advice
