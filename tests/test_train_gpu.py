"""The GPU path of the trainer: bf16 autocast, fused AdamW, MFU in the metrics, a final model
saved from CUDA tensors. Skipped without a CUDA GPU; run by bench/gpu_tests.sh."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_helpers import one_thread, prepared_data_fixture, train_config, train_records  # noqa: F401

from upcycle.checkpoint import load_model
from upcycle.train import complete_checkpoints, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_moe_trains_in_bf16_on_the_gpu_and_resumes(prepared_data, tmp_path):
    config = train_config(
        prepared_data,
        tmp_path / "out",
        stop={"max_steps": 6},
        schedule={"decay_steps": 6},  # the same learning rates when the run is cut at step 3
        checkpoint={"every_steps": 3},
    )
    result = train(config, quiet=True)
    records = train_records(tmp_path / "out")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and r["mfu"] is not None and r["mfu"] > 0 for r in records)
    assert records[-1]["mfu_datasheet"] < records[-1]["mfu"]
    assert load_model(result.final_dir).config.moe.num_experts == 4
    assert [s for s, _ in complete_checkpoints(tmp_path / "out" / "checkpoints")] == [3, 6]

    # Resuming from step 3 on the GPU repeats steps 4-6 (bitwise equality is only promised on CPU).
    config["output"] = str(tmp_path / "again")
    train({**config, "stop": {"max_steps": 3}}, quiet=True)
    train(config, resume=True, quiet=True)
    again = train_records(tmp_path / "again")
    assert [r["step"] for r in again] == list(range(1, 7))
    for first, second in zip(records[3:], again[3:], strict=True):
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-2)
