"""Causal self-attention with grouped-query heads, through `scaled_dot_product_attention`.

Covers the dense families: optional bias on q/k/v (Qwen2) and on o (Llama's attention_bias),
optional per-head RMSNorm of queries and keys before RoPE (Qwen3), sliding-window masks
(Mistral). Masks are boolean, True where a query may attend.

Shape letters: B batch, S sequence, D model width, H query heads, Hk KV heads, Dh head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.model.config import ModelConfig
from upcycle.model.norm import RMSNorm
from upcycle.model.rope import apply_rope


class Attention(nn.Module):
    """One multi-head attention: q/k/v/o projections named as in HF Llama (`self_attn.*`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.attention_head_dim
        D, H, Hk, Dh = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * Dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, Hk * Dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, Hk * Dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(Dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(Dh, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
        mask_B1SS: torch.Tensor | None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHD = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim)
        k_BSHD = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim)
        v_BSHD = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHD, k_BSHD = self.q_norm(q_BSHD), self.k_norm(k_BSHD)
        q_BHSD = apply_rope(q_BSHD.transpose(1, 2), cos_BSD, sin_BSD)
        k_BHSD = apply_rope(k_BSHD.transpose(1, 2), cos_BSD, sin_BSD)
        out_BHSD = attend(q_BHSD, k_BHSD, v_BSHD.transpose(1, 2), mask_B1SS)
        return self.o_proj(out_BHSD.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


def attend(
    q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, mask_B1SS: torch.Tensor | None
) -> torch.Tensor:
    """SDPA, causal when no mask is given; GQA when there are fewer KV heads than query heads."""
    gqa = q_BHSD.shape[1] != k_BHSD.shape[1]
    if mask_B1SS is None:
        return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=mask_B1SS, enable_gqa=gqa)


def build_attention_mask(
    attention_mask_BS: torch.Tensor | None, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, S, S]: causal, minus padded keys, minus keys beyond the window.

    Returns None when plain causal attention suffices (no padding, no window), which lets SDPA
    take its fused causal kernels. A query at a padded position would see no key at all (NaN
    in softmax); it is allowed to see itself so that every row stays finite. Its output is
    meaningless and is never read.
    """
    has_padding = attention_mask_BS is not None and not bool(attention_mask_BS.all())
    if not has_padding and (sliding_window is None or sliding_window >= seq_len):
        return None
    query = torch.arange(seq_len, device=device)[:, None]
    key = torch.arange(seq_len, device=device)[None, :]
    allowed_SS = key <= query
    if sliding_window is not None:
        allowed_SS = allowed_SS & (query - key < sliding_window)
    allowed_B1SS = allowed_SS[None, None]
    if has_padding:
        allowed_B1SS = allowed_B1SS & attention_mask_BS.bool()[:, None, None, :]
    return allowed_B1SS | torch.eye(seq_len, dtype=torch.bool, device=device)[None, None]
