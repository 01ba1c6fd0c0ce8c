"""FLOP and parameter counts against hand counts (perf.md "Counting FLOPs") and real modules."""

from __future__ import annotations

import pytest
import torch

from upcycle.model.config import ModelConfig
from upcycle.model.flops import (
    active_parameters,
    attention_flops_per_token,
    total_parameters,
    training_flops_per_token,
)
from upcycle.model.transformer import Transformer

SEQ = 32
# V=100, D=16, F=40, L=2, H=4, Hk=2, Dh=4, untied, sequential blocks.
DENSE = {
    "vocab_size": 100,
    "hidden_size": 16,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def test_dense_hand_count() -> None:
    config = ModelConfig(**DENSE)
    attention = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16  # q, k, v (2 KV heads × 4), o = 768
    mlp = 3 * 16 * 40  # gate, up, down = 1920
    norms = 2 * 16
    layer = attention + mlp + norms  # 2720
    lm_head = 100 * 16
    active = 2 * layer + 16 + lm_head  # + final norm = 7056
    assert active_parameters(config) == active == 7056
    assert total_parameters(config) == active + 100 * 16 == 8656
    attention_term = 12 * 2 * 4 * 4 * SEQ  # 12 · L · H · Dh · S
    assert attention_flops_per_token(config, SEQ) == attention_term == 12288
    assert training_flops_per_token(config, SEQ) == 6 * 7056 + 12288 == 54624


def test_moe_hand_count() -> None:
    config = ModelConfig(
        **DENSE,
        moe={
            "num_experts": 8,
            "top_k": 2,
            "granularity": 2,  # expert width 40 / 2 = 20
            "num_shared_experts": 1,  # shared width defaults to the expert width, 20
            "shared_expert_gate": True,
            "layers": "every_other",  # layer 1 only
        },
    )
    dense_layer = 768 + 3 * 16 * 40 + 2 * 16  # 2720
    expert = 3 * 16 * 20  # 960
    router, shared, shared_gate = 8 * 16, expert, 16
    moe_active = router + 2 * expert + shared + shared_gate  # 3024
    moe_total = router + 8 * expert + shared + shared_gate  # 8784
    active = dense_layer + (768 + 2 * 16 + moe_active) + 16 + 100 * 16
    assert active_parameters(config) == active == 8160
    assert total_parameters(config) == dense_layer + (768 + 32 + moe_total) + 16 + 2 * 1600 == 15520
    assert training_flops_per_token(config, SEQ) == 6 * 8160 + 12288 == 61248


BAM = {
    "vocab_size": 100,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "block": "parallel",
    "moa": {"num_experts": 4},
    "moe": {"num_experts": 4, "top_k": 1, "routing": "softmax_topk"},
}


def test_bam_like_hand_count() -> None:
    config = ModelConfig(**BAM)
    one_attention = 4 * 16 * 16  # q, k, v, o, each 16 × 16 = 1024
    moa = 4 * one_attention + 4 * 16  # every expert + router = 4160
    expert = 3 * 16 * 32  # 1536
    moe_active, moe_total = 4 * 16 + expert, 4 * 16 + 4 * expert  # 1600, 6208
    norm = 16  # one shared norm per parallel block
    active = 2 * (norm + moa + moe_active) + 16 + 1600
    assert active_parameters(config) == active == 13168
    assert total_parameters(config) == 2 * (norm + moa + moe_total) + 16 + 1600 + 1600 == 23984
    attention_term = 12 * (2 * 4 * 4) * 4 * SEQ  # 12 · Σ_layers (E·H) · Dh · S
    assert attention_flops_per_token(config, SEQ) == attention_term == 49152
    assert training_flops_per_token(config, SEQ) == 6 * 13168 + 49152 == 128160


def test_bam_shared_kv_counts_the_shared_projections_once() -> None:
    config = ModelConfig(**{**BAM, "moa": {"num_experts": 4, "share_kv": True}})
    moa = 4 * (2 * 16 * 16) + 2 * 16 * 16 + 4 * 16  # E × (q, o) + one (k, v) + router = 2624
    active = 2 * (16 + moa + 1600) + 16 + 1600
    assert active_parameters(config) == active == 10096
    assert attention_flops_per_token(config, SEQ) == 49152  # still E·H heads


def test_routing_sets_the_experts_counted() -> None:
    expert, router, rest = 3 * 16 * 40, 4 * 16, 768 + 32  # rest: attention + norms of a layer
    for routing, counted in (("soft", 4), ("topk_softmax", 3)):
        moe = {"num_experts": 4, "routing": routing, **({"top_k": 3} if routing == "topk_softmax" else {})}
        config = ModelConfig(**{**DENSE, "num_hidden_layers": 1}, moe=moe)
        assert active_parameters(config) == rest + router + counted * expert + 16 + 1600
    # sample_top1: one expert per token, except the first MoE layer, which routes softly (§1.1).
    config = ModelConfig(**DENSE, moe={"num_experts": 4, "routing": "sample_top1"})
    assert active_parameters(config) == 2 * (rest + router) + (4 + 1) * expert + 16 + 1600
    config = ModelConfig(
        **DENSE, moe={"num_experts": 4, "routing": "sample_top1", "sample_top1_soft_first_layer": False}
    )
    assert active_parameters(config) == 2 * (rest + router) + (1 + 1) * expert + 16 + 1600


@pytest.mark.parametrize(
    "fields",
    [
        DENSE,
        {
            **DENSE,
            "qkv_bias": True,
            "o_bias": True,
            "mlp_bias": True,
            "qk_norm": True,
            "tie_word_embeddings": True,
        },
        {**DENSE, "moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 2, "shared_expert_gate": True}},
        {
            **DENSE,
            "hidden_act": "relu2",
            "moe": {"num_experts": 4, "top_k": 1, "routing": "softmax_topk", "gated": False},
        },
        {**BAM, "qkv_bias": True, "o_bias": True, "qk_norm": True},
        {
            **BAM,
            "qkv_bias": True,
            "qk_norm": True,
            "moa": {"num_experts": 3, "share_kv": True, "layers": [1]},
        },
    ],
)
def test_total_parameters_equal_the_built_model(fields: dict) -> None:
    config = ModelConfig(**fields)
    with torch.device("meta"):
        model = Transformer(config)
    assert total_parameters(config) == sum(p.numel() for p in model.parameters())


def test_flops_are_six_times_non_embedding_parameters_for_a_dense_model() -> None:
    config = ModelConfig(**DENSE)
    with torch.device("meta"):
        model = Transformer(config)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert training_flops_per_token(config, SEQ) == 6 * non_embedding + attention_flops_per_token(config, SEQ)
    assert active_parameters(config, include_embeddings=True) == non_embedding + 100 * 16
