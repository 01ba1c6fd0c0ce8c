"""Native format: save -> load is bit-exact, sharding works, transformers' Auto classes load it."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import build_hf_model, padded_batch, save_hf_model

import upcycle
from upcycle.model.init import init_weights


@pytest.fixture(params=["llama", "llama-tied", "qwen3"])
def hf_folder(request, tmp_path):
    return save_hf_model(build_hf_model(request.param), tmp_path / "hf")


def test_native_round_trip_is_exact(hf_folder, tmp_path):
    model = upcycle.load_model(hf_folder)
    native = upcycle.save_native(model, tmp_path / "native", tokenizer_from=hf_folder)
    reloaded = upcycle.load_model(native)
    assert reloaded.config == model.config
    original, restored = model.state_dict(), reloaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, reloaded(ids, mask).logits)
    config = json.loads((native / "config.json").read_text())
    assert config["model_type"] == "upcycle" and config["upcycle"]["hidden_size"] == model.config.hidden_size
    assert (native / "generation_config.json").is_file()
    assert (native / "README.md").is_file()


def test_transformers_auto_classes_load_native(hf_folder, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = upcycle.load_model(hf_folder)
    native = upcycle.save_native(model, tmp_path / "native")
    assert type(AutoConfig.from_pretrained(native)).__name__ == "UpcycleConfig"
    hf_model, info = AutoModelForCausalLM.from_pretrained(native, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(hf_model(input_ids=ids, attention_mask=mask).logits, model(ids, mask).logits)


def test_sharded_native_and_hf_checkpoints_load(tmp_path):
    hf_model = build_hf_model("llama")
    hf_sharded = save_hf_model(hf_model, tmp_path / "hf", max_shard_size="20KB")
    assert (hf_sharded / "model.safetensors.index.json").is_file()
    model = upcycle.load_model(hf_sharded)
    native = upcycle.save_native(model, tmp_path / "native", max_shard_bytes=30_000)
    index = json.loads((native / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = upcycle.load_model(native)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    ids, _ = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = hf_model(input_ids=ids).logits
        assert (reloaded(ids).logits - expected).abs().max() <= 1e-5


def test_load_in_bf16_and_fresh_init_is_seeded(tmp_path):
    folder = save_hf_model(build_hf_model("llama"), tmp_path / "hf")
    model = upcycle.load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    config = model.config
    first = init_weights(upcycle.Transformer(config), seed=3).state_dict()
    second = init_weights(upcycle.Transformer(config), seed=3).state_dict()
    third = init_weights(upcycle.Transformer(config), seed=4).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], third["model.embed_tokens.weight"])
