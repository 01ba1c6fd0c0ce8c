"""The attention projections as one GEMM (`Attention.project_qkv`, taken on a GPU from
`FUSED_QKV_MIN_TOKENS` tokens) compute what the three separate projections do, forward and
backward, eager and compiled; forced on here on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from upcycle.model import ModelConfig, attention
from upcycle.model.attention import Attention
from upcycle.model.rope import rope_cos_sin

CONFIGS = {
    "gqa": dict(num_key_value_heads=2),
    "bias-mha": dict(qkv_bias=True),
    "qk-norm-gqa": dict(num_key_value_heads=1, qk_norm=True),
}


def _layer(extra: dict) -> tuple[Attention, ModelConfig]:
    config = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, **extra)  # fmt: skip
    torch.manual_seed(0)
    layer = Attention(config).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer, config


def _run(layer: Attention, config: ModelConfig, x: torch.Tensor, fused: bool, monkeypatch, fn=None):
    monkeypatch.setattr(attention, "fuses_qkv", lambda x_BSD: fused)
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    cos, sin = rope_cos_sin(config.rope, config.attention_head_dim, positions, x.dtype)
    out = (layer if fn is None else fn)(x, cos, sin, None)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_gemm_equals_three(name: str, monkeypatch) -> None:
    layer, config = _layer(CONFIGS[name])
    x = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda *a: (calls.append(a[1].shape[0]), linear(*a))[1]
    )
    out_a, dx_a, grads_a = _run(layer, config, x, False, monkeypatch)
    N, Nk = (
        config.num_attention_heads * config.attention_head_dim,
        config.kv_heads * config.attention_head_dim,
    )
    assert calls == [N, Nk, Nk, 32]  # q, k, v, o
    calls.clear()
    out_b, dx_b, grads_b = _run(layer, config, x, True, monkeypatch)
    assert calls == [N + 2 * Nk, 32]  # qkv as one, o
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_b, dx_a, rtol=1e-12, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", ["gqa", "bias-mha"])
def test_compiled_one_gemm_equals_eager_three(name: str, monkeypatch) -> None:
    # (not qk-norm: its RMSNorm computes in fp32, which inductor fuses differently from eager)
    torch._dynamo.reset()
    layer, config = _layer(CONFIGS[name])
    x = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out_a, dx_a, grads_a = _run(layer, config, x, False, monkeypatch)
    out_b, dx_b, grads_b = _run(layer, config, x, True, monkeypatch, fn=torch.compile(layer))
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx_b, dx_a, rtol=1e-10, atol=1e-10)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-10, atol=1e-10, msg=n)


def test_fused_only_on_a_gpu_from_the_threshold() -> None:
    assert not attention.fuses_qkv(torch.empty(4, attention.FUSED_QKV_MIN_TOKENS, 8))  # CPU
    assert not attention.fuses_qkv(torch.empty(4, attention.FUSED_QKV_MIN_TOKENS, 8, device="meta"))
