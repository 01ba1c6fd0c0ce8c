"""Parameter and FLOP counts from a `ModelConfig`, as perf.md "Counting FLOPs" defines them.

    training FLOPs per token = 6 · active parameters + 12 · Σ_layers H_l · Dh · S

- Active parameters: those one token's forward pass multiplies by, embeddings excluded (a
  lookup) and the LM head included (also when it is tied to the embedding).
  - An MoE layer counts its K routed experts (all E for soft routing, 1 for sample_top1 except
    in its softly routed first layer), the shared experts, their sigmoid gate and the router
    (methods.md §1).
  - A MoA layer counts all E attention experts, whatever the routing: the implementations
    compute every expert for every token (soft routing needs them all; the top-k ablation
    weights the others by 0). Shared-KV counts its one K/V projection once (methods.md §4.2).
  - Norm weights and biases count too: they are parameters of the forward pass.
- The attention term is the QKᵀ and AV products (2·2·S·H·Dh per token forward, times 3 for
  forward and backward), without causal halving (torchtitan's convention) and without the
  sliding window; a MoA layer has E·H heads.
- `total_parameters` is the size of the state dict: every expert, embeddings, a tied matrix
  once. It equals `sum(p.numel() for p in Transformer(config).parameters())`.

Shape letters: V vocabulary, D model width, F FFN width, E experts, K experts per token,
H query heads, Hk KV heads, Dh head width, L layers, S sequence.
"""

from __future__ import annotations

from upcycle.model.config import ModelConfig


def _attention_parameters(config: ModelConfig) -> tuple[int, int]:
    """(query+output part, key+value part) of one dense attention, with biases and QK-norm."""
    D, H, Hk, Dh = config.hidden_size, config.num_attention_heads, config.kv_heads, config.attention_head_dim
    query_output = 2 * D * H * Dh + (H * Dh if config.qkv_bias else 0) + (D if config.o_bias else 0)
    key_value = 2 * D * Hk * Dh + (2 * Hk * Dh if config.qkv_bias else 0)
    if config.qk_norm:
        query_output, key_value = query_output + Dh, key_value + Dh
    return query_output, key_value


def _attention_layer_parameters(config: ModelConfig, layer_index: int) -> int:
    query_output, key_value = _attention_parameters(config)
    if not config.is_moa_layer(layer_index):
        return query_output + key_value
    assert config.moa is not None
    E, D = config.moa.num_experts, config.hidden_size
    shared_key_value = key_value if config.moa.share_kv else E * key_value
    return E * query_output + shared_key_value + E * D


def _mlp_parameters(hidden_size: int, width: int, gated: bool, bias: bool = False) -> int:
    matrices = (3 if gated else 2) * hidden_size * width
    if not bias:
        return matrices
    return matrices + (2 if gated else 1) * width + hidden_size


def _ffn_layer_parameters(config: ModelConfig, layer_index: int, active: bool) -> int:
    D = config.hidden_size
    if not config.is_moe_layer(layer_index):
        return _mlp_parameters(D, config.intermediate_size, True, config.mlp_bias)
    moe = config.moe
    assert moe is not None and config.moe_intermediate_size is not None
    experts = config.moe_experts_per_token(layer_index) if active else moe.num_experts
    routed = experts * _mlp_parameters(D, config.moe_intermediate_size, moe.gated)
    shared = _mlp_parameters(D, config.shared_expert_intermediate_size, moe.gated)
    shared_gate = D if moe.shared_expert_gate else 0
    return routed + shared + shared_gate + moe.num_experts * D


def _layer_norm_parameters(config: ModelConfig) -> int:
    return config.hidden_size * (1 if config.block == "parallel" else 2)


def _body_parameters(config: ModelConfig, active: bool) -> int:
    """Every block and the final norm (no embeddings, no LM head)."""
    total = config.hidden_size
    for layer in range(config.num_hidden_layers):
        total += _layer_norm_parameters(config)
        total += _attention_layer_parameters(config, layer)
        total += _ffn_layer_parameters(config, layer, active)
    return total


def total_parameters(config: ModelConfig) -> int:
    """All parameters, every expert included; a tied embedding/LM-head matrix counts once."""
    embeddings = config.vocab_size * config.hidden_size
    lm_head = 0 if config.tie_word_embeddings else embeddings
    return embeddings + lm_head + _body_parameters(config, active=False)


def active_parameters(config: ModelConfig, include_embeddings: bool = False) -> int:
    """Parameters one token uses: LM head included, input embeddings only if asked (untied)."""
    vocabulary = config.vocab_size * config.hidden_size
    embeddings = vocabulary if include_embeddings and not config.tie_word_embeddings else 0
    return _body_parameters(config, active=True) + vocabulary + embeddings


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """12 · Σ_layers H_l · Dh · S, with H_l = E·H in MoA layers (perf.md)."""
    heads = 0
    for layer in range(config.num_hidden_layers):
        experts = config.moa.num_experts if config.is_moa_layer(layer) and config.moa else 1
        heads += experts * config.num_attention_heads
    return 12 * heads * config.attention_head_dim * seq_len


def training_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs per token: 6 · active parameters + the attention term."""
    return 6 * active_parameters(config) + attention_flops_per_token(config, seq_len)
