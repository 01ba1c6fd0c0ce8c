"""The CLI on checkpoints: --version, init, inspect, and the refusals of bad checkpoints."""

from __future__ import annotations

import io
import json
import shutil
import struct

import pytest
import torch
from cli_helpers import assert_refused, run_cli
from hf_models import build_hf_model, save_hf_model

import upcycle


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_hf_model(build_hf_model("llama"), tmp_path_factory.mktemp("ckpt") / "hf")


def test_version():
    result = run_cli("--version", subprocess=True)
    assert result.returncode == 0 and result.stdout.strip() == f"upcycle {upcycle.__version__}"


def test_init_then_inspect(tmp_path):
    out = tmp_path / "tiny"
    assert run_cli("init", "examples/tiny-model.yaml", out).returncode == 0
    result = run_cli("inspect", out)
    assert result.returncode == 0, result.stderr
    model = upcycle.load_model(out)
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in result.stdout
    assert "model.layers.1.mlp.down_proj.weight" in result.stdout
    assert_refused(run_cli("init", "examples/tiny-model.yaml", out), "already exists", "--overwrite")


def test_inspect_hf_checkpoint(hf_folder):
    result = run_cli("inspect", hf_folder, "--no-tensors")
    assert result.returncode == 0 and "HF llama" in result.stdout and "tensors" in result.stdout


def test_truncated_safetensors_is_refused(hf_folder, tmp_path):
    broken = shutil.copytree(hf_folder, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_refused(run_cli("inspect", broken, subprocess=True), "truncated", "model.safetensors")


def test_header_beyond_file_is_refused(hf_folder, tmp_path):
    broken = shutil.copytree(hf_folder, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    assert_refused(run_cli("inspect", broken), "truncated")


def test_unknown_architecture_lists_supported(hf_folder, tmp_path):
    other = shutil.copytree(hf_folder, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (other / "config.json").write_text(json.dumps(config))
    assert_refused(
        run_cli("inspect", other),
        "'gpt_neox' is not supported",
        "llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe",
    )


def test_missing_folder_and_config(tmp_path):
    assert_refused(run_cli("inspect", tmp_path / "nope"), "does not exist")
    assert_refused(run_cli("inspect", tmp_path), "no config.json")


def _bin_folder(hf_folder, tmp_path, payload_bytes: bytes):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(hf_folder / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(payload_bytes)
    return folder


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickle_with_forbidden_global_is_refused(hf_folder, tmp_path):
    buffer = io.BytesIO()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": _RunsCode()}, buffer)
    folder = _bin_folder(hf_folder, tmp_path, buffer.getvalue())
    result = run_cli("inspect", folder, subprocess=True)
    assert_refused(result, "refused", "safetensors")
    assert "this pickle runs code" not in result.stdout


def test_plain_weights_only_bin_loads(hf_folder, tmp_path):
    state = upcycle.load_model(hf_folder).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    folder = _bin_folder(hf_folder, tmp_path, buffer.getvalue())
    reloaded = upcycle.load_model(folder)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())


def test_shape_mismatch_and_missing_tensor_are_refused(hf_folder, tmp_path):
    wrong = shutil.copytree(hf_folder, tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(config))
    assert_refused(run_cli("inspect", wrong, "--no-tensors"), "mlp")  # inspect reads config only
    with pytest.raises(upcycle.UpcycleError, match="has shape"):
        upcycle.load_model(wrong)

    from safetensors.torch import load_file, save_file

    missing = shutil.copytree(hf_folder, tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(upcycle.UpcycleError, match=r"lacks 1 tensor.*up_proj"):
        upcycle.load_model(missing)
