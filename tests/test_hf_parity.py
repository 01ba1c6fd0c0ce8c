"""Our Transformer reproduces HF dense checkpoints: logits at fp32 within 1e-5 on a padded batch,
and 20 greedy tokens identical to HF's generate."""

from __future__ import annotations

import pytest
import torch
from hf_models import FAMILIES, build_hf_model, padded_batch, save_hf_model

import upcycle


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_greedy_match_transformers(family, tmp_path):
    hf_model = build_hf_model(family)
    folder = save_hf_model(hf_model, tmp_path / family)
    ours = upcycle.load_model(folder)
    ids, mask = padded_batch(hf_model.config.vocab_size)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, mask, positions).logits
        unpadded_expected = hf_model(input_ids=ids[2:]).logits
        unpadded_got = ours(ids[2:]).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-5
    assert (unpadded_got - unpadded_expected).abs().max().item() <= 1e-5

    hf_tokens = hf_model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    our_tokens = ours.generate(ids, 20, mask, stop_at_eos=False)
    assert torch.equal(hf_tokens, our_tokens)


def test_config_mapping_reads_families(tmp_path):
    qwen2 = upcycle.load_config(save_hf_model(build_hf_model("qwen2"), tmp_path / "q2"))
    qwen3 = upcycle.load_config(save_hf_model(build_hf_model("qwen3"), tmp_path / "q3"))
    mistral = upcycle.load_config(save_hf_model(build_hf_model("mistral"), tmp_path / "m"))
    llama3 = upcycle.load_config(save_hf_model(build_hf_model("llama3-rope"), tmp_path / "l3"))
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == (True, False, False)
    assert (qwen3.qk_norm, qwen3.head_dim) == (True, 16)
    assert mistral.sliding_window == 5
    assert (llama3.rope.type, llama3.rope.factor, llama3.rope.theta) == ("llama3", 8.0, 500000.0)
    assert llama3.tie_word_embeddings


def test_transformers4_style_rope_keys_are_read():
    from upcycle.checkpoint.architectures import model_config_from_hf

    config = model_config_from_hf(
        {
            "model_type": "llama",
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "rope_theta": 1234.0,
            "rope_scaling": {"type": "linear", "factor": 4.0},
        }
    )
    assert (config.rope.theta, config.rope.type, config.rope.factor) == (1234.0, "linear", 4.0)
