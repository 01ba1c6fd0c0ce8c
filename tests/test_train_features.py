"""Config, schedule and budgets; branch training from a checkpoint folder with domain weights;
freezing; activation checkpointing; a BAM model; the example YAMLs; `upcycle data prepare`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import assert_refused, run_cli
from safetensors.torch import load_file
from test_train_helpers import (  # noqa: F401
    DENSE,
    MOE,
    VOCAB,
    one_thread,
    prepared_data_fixture,
    train_config,
    train_records,
)

from upcycle.checkpoint import load_config, save_native
from upcycle.data import load_manifest
from upcycle.data.synthetic import synthetic_documents
from upcycle.errors import UpcycleError
from upcycle.model import ModelConfig, Transformer
from upcycle.model.flops import training_flops_per_token
from upcycle.model.init import init_weights
from upcycle.train import TrainConfig, WarmupCosine, train
from upcycle.train.config import BatchConfig
from upcycle.train.preflight import batch_layout, plan_run

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("train-*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_validate(path):
    config = TrainConfig.model_validate(yaml.safe_load(path.read_text()))
    assert config.checkpoint.keep_last_k is None or config.checkpoint.keep_last_k >= 2


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"train-tiny.yaml", "train-branch.yaml", "train-moe-finetune.yaml"}


def test_warmup_then_cosine_to_the_floor():
    schedule = WarmupCosine(lr=1.0, warmup_steps=4, decay_steps=14, min_lr_ratio=0.1)
    assert [schedule(s) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(14) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)
    assert all(schedule(s) >= schedule(s + 1) for s in range(4, 20))


def test_batch_layout():
    assert batch_layout(BatchConfig(global_batch_size=8), 1) == (8, 1)
    assert batch_layout(BatchConfig(global_batch_size=8, micro_batch_size=2), 2) == (2, 2)
    assert batch_layout(BatchConfig(global_batch_size=8, grad_accumulation=4), 1) == (2, 4)
    assert batch_layout(BatchConfig(global_batch_size=8, micro_batch_size=2, grad_accumulation=4), 1) == (
        2,
        4,
    )
    for batch, world in (({"global_batch_size": 6}, 4), ({"global_batch_size": 8, "micro_batch_size": 3}, 1)):
        with pytest.raises(UpcycleError):
            batch_layout(BatchConfig(**batch), world)


def test_token_and_flop_budgets_round_up_to_whole_steps(prepared_data, tmp_path):
    tokens_per_step = 8 * 32
    by_tokens = TrainConfig.model_validate(
        train_config(prepared_data, tmp_path / "a", stop={"max_tokens": 3 * tokens_per_step + 1})
    )
    assert plan_run(by_tokens, 1, resume=False).total_steps == 4
    flops_per_step = training_flops_per_token(ModelConfig(**MOE), 32) * tokens_per_step
    by_flops = TrainConfig.model_validate(
        train_config(prepared_data, tmp_path / "b", stop={"max_flops": 2.5 * flops_per_step})
    )
    plan = plan_run(by_flops, 1, resume=False)
    assert plan.total_steps == 3 and plan.flops_per_step == flops_per_step


def test_branch_from_a_checkpoint_folder_reads_only_its_domain(prepared_data, tmp_path):
    """BTX's branch phase: a dense native folder with the data's tokenizer, weight on one domain."""
    tokenizer = Path(load_manifest(prepared_data).tokenizer.path)
    seed = save_native(
        init_weights(Transformer(ModelConfig(**DENSE)), seed=3), tmp_path / "seed", tokenizer_from=tokenizer
    )
    config = train_config(
        prepared_data,
        tmp_path / "out",
        model={"path": str(seed)},
        data={"weights": {"code": 1.0}},
        stop={"max_steps": 2},
        checkpoint={"every_steps": 2},
    )
    result = train(config, quiet=True)
    state = json.loads(
        (tmp_path / "out" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text()
    )
    assert state["data"]["sampler"]["domain_samples"] == {"code": 16, "math": 0}
    assert load_config(result.final_dir) == ModelConfig(**DENSE)
    assert (result.final_dir / "tokenizer.json").read_bytes() == (tokenizer / "tokenizer.json").read_bytes()
    assert train_records(tmp_path / "out")[0]["aux_losses"] == {}  # dense: no aux loss


@pytest.mark.parametrize(
    ("mode", "trains"),
    [
        ("all_but_routers", lambda name: name.endswith("mlp.gate.weight")),
        ("experts", lambda name: ".experts." not in name),
    ],
)
def test_freeze_keeps_frozen_weights_exactly(mode, trains, prepared_data, tmp_path):
    config = train_config(
        prepared_data, tmp_path / "out", freeze=mode, stop={"max_steps": 2}, schedule={"warmup_steps": 0}
    )
    result = train(config, quiet=True)
    initial = init_weights(Transformer(ModelConfig(**MOE)), seed=0).state_dict()
    final = load_file(result.final_dir / "model.safetensors")
    for name, tensor in final.items():
        assert torch.equal(tensor, initial[name]) != trains(name), name


def test_activation_checkpointing_gives_the_same_steps(prepared_data, tmp_path):
    runs = {}
    for checkpointing in (False, True):
        output = tmp_path / str(checkpointing)
        config = train_config(
            prepared_data, output, activation_checkpointing=checkpointing, stop={"max_steps": 3}
        )
        train(config, quiet=True)
        runs[checkpointing] = [(r["loss"], r["grad_norm"]) for r in train_records(output)]
    assert runs[True] == runs[False]


def test_a_bam_model_trains_and_logs_each_aux_loss(prepared_data, tmp_path):
    bam = dict(
        DENSE,
        block="parallel",
        moe={"num_experts": 2, "top_k": 1, "routing": "softmax_topk", "implementation": "eager"},
        moa={"num_experts": 2, "z_loss_coef": 1e-3},
    )
    config = train_config(prepared_data, tmp_path / "out", model_config=bam, stop={"max_steps": 2})
    train(config, quiet=True)
    record = train_records(tmp_path / "out")[-1]
    assert set(record["aux_losses"]) == {"moe_load_balancing", "moa_z_loss"}
    assert record["loss"] == pytest.approx(record["lm_loss"] + sum(record["aux_losses"].values()), rel=1e-6)


def test_data_prepare_command(prepared_data, tmp_path):
    source = tmp_path / "notes.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(20, seed=5)))
    tokenizer = load_manifest(prepared_data).tokenizer.path
    config = {
        "domains": {"notes": {"paths": [str(source)]}},
        "tokenizer": tokenizer,
        "heldout": {"fraction": 0.1},
    }
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("data", "prepare", path, tmp_path / "prepared", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "1 domain(s)" in result.stdout
    assert load_manifest(tmp_path / "prepared").tokenizer.id_upper_bound <= VOCAB
    config["domains"]["notes"]["paths"] = [str(tmp_path / "absent.jsonl")]
    path.write_text(yaml.safe_dump(config))
    assert_refused(run_cli("data", "prepare", path, tmp_path / "other", "--quiet"), "does not exist")
    assert not (tmp_path / "other").exists()


def test_bf16_weights_keep_routers_in_fp32() -> None:
    from upcycle.train.build import cast_to_bf16_weights

    bam = dict(
        DENSE,
        block="parallel",
        moe={"num_experts": 2, "top_k": 1, "routing": "softmax_topk", "implementation": "eager"},
        moa={"num_experts": 2},
    )
    model = init_weights(Transformer(ModelConfig(**bam)), seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cast_to_bf16_weights(model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    routers = {name for name in dtypes if name.endswith(("mlp.gate.weight", "self_attn.router.weight"))}
    assert len(routers) == 2 * DENSE["num_hidden_layers"], routers
    assert all(dtypes[name] == torch.float32 for name in routers)
    assert all(dtype == torch.bfloat16 for name, dtype in dtypes.items() if name not in routers)
    for name, p in model.named_parameters():  # a cast, nothing else
        assert torch.equal(p, before[name].to(p.dtype)), name


def test_bf16_weights_train_like_fp32_master_weights(prepared_data, tmp_path):
    """`precision: bf16-weights` runs the trainer's step on bf16 weights and bf16 AdamW moments:
    its first loss is the fp32-master run's (both under bf16 autocast) within bf16 rounding, its
    weights move, and the final model is saved."""
    runs = {}
    for precision in ("bf16", "bf16-weights"):
        output = tmp_path / precision
        config = train_config(
            prepared_data, output, precision=precision, stop={"max_steps": 3}, schedule={"warmup_steps": 0}
        )
        result = train(config, quiet=True)
        runs[precision] = [r["loss"] for r in train_records(output)]
        final = load_file(result.final_dir / "model.safetensors")
        initial = init_weights(Transformer(ModelConfig(**MOE)), seed=0).state_dict()
        moved = [name for name, t in final.items() if not torch.equal(t.float(), initial[name].float())]
        assert len(moved) == len(final), set(final) - set(moved)
    assert all(math.isfinite(loss) for losses in runs.values() for loss in losses)
    assert runs["bf16-weights"][0] == pytest.approx(runs["bf16"][0], rel=1e-2)
    assert runs["bf16-weights"][-1] == pytest.approx(runs["bf16"][-1], rel=5e-2)


def test_bf16_weights_resume_bit_for_bit(prepared_data, tmp_path):
    """A bf16-weights run resumed from its step-3 checkpoint continues exactly as the straight
    run: bf16 weights and moments and fp32 routers come back as they were saved."""
    import shutil

    settings = dict(precision="bf16-weights", stop={"max_steps": 5}, checkpoint={"every_steps": 3})
    straight = train_config(prepared_data, tmp_path / "straight", **settings)
    train(straight, quiet=True)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000005")
    shutil.rmtree(tmp_path / "resumed" / "final")
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= 3]
    (tmp_path / "resumed" / "metrics.jsonl").write_text("".join(kept))
    train({**straight, "output": str(tmp_path / "resumed")}, resume=True, quiet=True)
    losses = {run: [r["loss"] for r in train_records(tmp_path / run)] for run in ("straight", "resumed")}
    assert len(losses["straight"]) == 5 and losses["resumed"] == losses["straight"]
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
