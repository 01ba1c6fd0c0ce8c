"""Mixture of attention experts (methods.md §4.2): wide fast path against the eager loop, and
function preservation against dense attention (methods.md §7 F7, F8).

Shape letters: B batch, S sequence, D model width, E experts, H query heads, Hk KV heads,
Dh head width, X wide query heads, Y wide KV heads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from upcycle.kernels.wide_attention import WideLayout
from upcycle.model.attention import Attention, build_attention_mask
from upcycle.model.config import MoAConfig, ModelConfig
from upcycle.model.init import init_weights
from upcycle.model.moa import MixtureOfAttention, stack_attention_experts
from upcycle.model.rope import rope_cos_sin
from upcycle.model.transformer import Transformer

B, S, D, Dh = 2, 7, 32, 8
EXTRAS = {
    "plain": {},
    "bias": {"qkv_bias": True, "o_bias": True},
    "qk_norm": {"qk_norm": True},
}


def make_config(heads: int = 4, kv_heads: int = 2, extras: str = "plain", **moa: object) -> ModelConfig:
    """A tiny config; the MoA section from `moa` (none when empty: a dense model)."""
    return ModelConfig(
        vocab_size=64,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=Dh,
        moa=MoAConfig(**moa) if moa else None,
        **EXTRAS[extras],
    )


def make_inputs(
    config: ModelConfig, padded: bool, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random u_BSD, RoPE tables and a mask (left padding in the second sequence when `padded`)."""
    u_BSD = torch.randn(B, S, D, dtype=dtype)
    attention_mask_BS = torch.ones(B, S, dtype=torch.long)
    positions_BS = torch.arange(S)[None].expand(B, S)
    if padded:
        attention_mask_BS[1, :3] = 0
        positions_BS = (attention_mask_BS.cumsum(-1) - 1).clamp(min=0)
    cos_BSD, sin_BSD = rope_cos_sin(config.rope, Dh, positions_BS, dtype)
    mask_B1SS = build_attention_mask(attention_mask_BS, S, None, u_BSD.device)
    assert (mask_B1SS is not None) == padded
    return u_BSD, cos_BSD, sin_BSD, mask_B1SS


@torch.no_grad()
def randomise(module: torch.nn.Module, router_std: float = 1.0) -> None:
    """Every parameter random, so that no wiring mistake hides; activations stay O(1).

    Projection weights N(0, 1/fan_in), biases N(0, 0.1²), norm weights U(0.5, 1.5) and a router
    of std `router_std` (large, so that gates are far from uniform).
    """
    for name, param in module.named_parameters():
        if "router" in name:
            param.normal_(std=router_std)
        elif "norm" in name:
            param.uniform_(0.5, 1.5)
        elif "bias" in name:
            param.normal_(std=0.1)
        else:
            param.normal_(std=param.shape[-1] ** -0.5)


def forward_and_grads(
    moa: MixtureOfAttention, implementation: str, inputs: tuple, probe_BSD: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    moa.implementation = implementation
    u_BSD, cos_BSD, sin_BSD, mask_B1SS = inputs
    u_BSD = u_BSD.clone().requires_grad_()
    out_BSD, aux = moa(u_BSD, cos_BSD, sin_BSD, mask_B1SS)
    loss = (out_BSD * probe_BSD).sum() + sum(aux.values())
    params = dict(moa.named_parameters())
    grads = torch.autograd.grad(loss, [u_BSD, *params.values()])
    return out_BSD, aux, dict(zip(["input", *params], grads, strict=True))


@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("routing", ["soft", "topk"])
@pytest.mark.parametrize("share_kv", [False, True], ids=["expert_kv", "shared_kv"])
def test_wide_matches_eager(share_kv: bool, routing: str, heads: tuple, padded: bool, extras: str) -> None:
    torch.manual_seed(0)
    config = make_config(
        *heads,
        extras,
        num_experts=3,
        routing=routing,
        top_k=2 if routing == "topk" else None,
        share_kv=share_kv,
        z_loss_coef=0.01,
    )
    moa = MixtureOfAttention(config, layer_index=0)
    randomise(moa)
    inputs = make_inputs(config, padded)
    probe_BSD = torch.randn(B, S, D)
    eager_out, eager_aux, eager_grads = forward_and_grads(moa, "eager", inputs, probe_BSD)
    wide_out, wide_aux, wide_grads = forward_and_grads(moa, "wide", inputs, probe_BSD)
    assert_close(wide_out, eager_out, atol=1e-5, rtol=0)
    assert eager_aux.keys() == wide_aux.keys() == {"moa_z_loss"}
    assert_close(wide_aux["moa_z_loss"], eager_aux["moa_z_loss"], atol=1e-6, rtol=1e-6)
    for name, eager_grad in eager_grads.items():
        assert eager_grad.abs().max() > 0, f"{name} got no gradient"
        assert_close(wide_grads[name], eager_grad, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("routing", ["soft", "topk"])
@pytest.mark.parametrize("share_kv", [False, True], ids=["expert_kv", "shared_kv"])
def test_gradients_match_finite_differences(share_kv: bool, routing: str) -> None:
    """fp64 gradcheck through the gate: the router learns from the mixture, not only the z-loss.

    Run on the wide path; test_wide_matches_eager carries the result over to the eager loop.
    """
    torch.manual_seed(7)
    top_k = 2 if routing == "topk" else None
    config = make_config(4, 2, "bias", num_experts=3, routing=routing, top_k=top_k, share_kv=share_kv)
    moa = MixtureOfAttention(config, 0).double()
    randomise(moa)
    moa.implementation = "wide"
    u_BSD, cos_BSD, sin_BSD, mask_B1SS = make_inputs(config, padded=True, dtype=torch.float64)

    def mixture(u_BSD: torch.Tensor, router_weight_ED: torch.Tensor) -> torch.Tensor:
        inputs = (u_BSD, cos_BSD, sin_BSD, mask_B1SS)
        return torch.func.functional_call(moa, {"router.weight": router_weight_ED}, inputs)[0]

    weight_ED = moa.router.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(mixture, (u_BSD.requires_grad_(), weight_ED), fast_mode=True)


@pytest.mark.parametrize("share_kv", [False, True], ids=["expert_kv", "shared_kv"])
@pytest.mark.parametrize("heads", [(4, 1), (4, 2), (6, 3), (4, 4)])
def test_wide_head_order_pairs_each_query_head_with_its_kv_head(share_kv: bool, heads: tuple) -> None:
    """SDPA's GQA: wide query head i reads KV head i // (X / Y); it must be expert e's own."""
    E, (H, Hk) = 3, heads
    layout = WideLayout(E, H, Hk, Dh, share_kv)
    expert_head_EH = torch.arange(E * H).view(E, H)
    wide_X = layout.to_wide_heads(expert_head_EH, 0)
    assert sorted(wide_X.tolist()) == list(range(E * H))
    group = layout.wide_heads // layout.wide_kv_heads
    for i, code in enumerate(wide_X.tolist()):
        e, h = divmod(code, H)
        own_kv_head = h // (H // Hk) + (0 if share_kv else e * Hk)
        assert i // group == own_kv_head


@pytest.mark.parametrize("share_kv", [False, True], ids=["expert_kv", "shared_kv"])
def test_wide_is_one_attention_call(share_kv: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(num_experts=3, share_kv=share_kv)
    moa = MixtureOfAttention(config, 0)
    inputs = make_inputs(config, padded=False)
    calls: list[tuple[int, int]] = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kwargs):
        calls.append((q.shape[1], k.shape[1]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    moa.implementation = "wide"
    moa(*inputs)
    assert calls == [(3 * 4, 2 if share_kv else 3 * 2)]
    calls.clear()
    moa.implementation = "eager"
    moa(*inputs)
    assert calls == [(4, 2)] * 3


@pytest.mark.parametrize("implementation", ["eager", "wide"])
@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("share_kv", [False, True], ids=["expert_kv", "shared_kv"])
def test_identical_experts_equal_dense_attention(share_kv: bool, extras: str, implementation: str) -> None:
    """F7: E copies of one dense attention under soft routing are that attention, any router."""
    torch.manual_seed(1)
    config = make_config(4, 2, extras, num_experts=3, share_kv=share_kv, implementation=implementation)
    dense = Attention(config).double()
    randomise(dense)
    moa = MixtureOfAttention.from_dense(config, [dense] * 3)
    randomise(moa.router, router_std=2.0)
    for padded in (False, True):
        inputs = make_inputs(config, padded, torch.float64)
        gate_BSE, _ = moa.route(inputs[0])
        assert gate_BSE.max() - gate_BSE.min() > 0.3, "the gate should be far from uniform"
        out_BSD, _ = moa(*inputs)
        assert_close(out_BSD, dense(*inputs), atol=1e-10, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "wide"])
@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("share_kv", [False, True], ids=["expert_kv", "shared_kv"])
def test_one_hot_gate_reproduces_each_source(share_kv: bool, extras: str, implementation: str) -> None:
    """F8: a gate e_j gives dense attention j. Shared-KV sources share K/V (else none is exact)."""
    torch.manual_seed(2)
    config = make_config(4, 2, extras, num_experts=3, share_kv=share_kv, implementation=implementation)
    sources = [Attention(config).double() for _ in range(3)]
    for source in sources:
        randomise(source)
    if share_kv:
        kv_state = {n: t for n, t in sources[0].state_dict().items() if n.startswith(("k_", "v_"))}
        for source in sources[1:]:
            source.load_state_dict(kv_state, strict=False)
    moa = MixtureOfAttention.from_dense(config, sources)
    inputs = make_inputs(config, padded=True, dtype=torch.float64)
    dense_outs = [source(*inputs) for source in sources]
    for j, dense_out_BSD in enumerate(dense_outs):
        moa.gate_override = F.one_hot(torch.tensor(j), 3).double()
        out_BSD, _ = moa(*inputs)
        assert_close(out_BSD, dense_out_BSD, atol=1e-10, rtol=0)
        assert (out_BSD - dense_outs[(j + 1) % 3]).abs().max() > 1e-3, "sources should differ"


def test_topk_gate_keeps_the_k_largest_probabilities_unnormalised() -> None:
    torch.manual_seed(3)
    config = make_config(num_experts=4, routing="topk", top_k=2)
    moa = MixtureOfAttention(config, 0)
    randomise(moa.router)
    u_BSD = torch.randn(B, S, D)
    gate_BSE, logits_BSE = moa.route(u_BSD)
    probs_BSE = logits_BSE.softmax(-1)
    assert ((gate_BSE > 0).sum(-1) == 2).all()
    kept_BSE = gate_BSE > 0
    assert_close(gate_BSE[kept_BSE], probs_BSE[kept_BSE])
    smallest_kept_BS = gate_BSE.masked_fill(~kept_BSE, 2.0).amin(-1)
    largest_dropped_BS = probs_BSE.masked_fill(kept_BSE, -1.0).amax(-1)
    assert (smallest_kept_BS >= largest_dropped_BS).all()
    assert (gate_BSE.sum(-1) < 1 - 1e-4).all()


@pytest.mark.parametrize("coef", [0.0, 0.05])
def test_z_loss(coef: float) -> None:
    torch.manual_seed(4)
    config = make_config(num_experts=3, z_loss_coef=coef)
    moa = MixtureOfAttention(config, 0)
    randomise(moa.router)
    inputs = make_inputs(config, padded=False)
    _, aux = moa(*inputs)
    if coef == 0:
        assert aux == {}
        return
    logits_BSE = inputs[0] @ moa.router.weight.T
    expected = coef * (logits_BSE.exp().sum(-1).log() ** 2).mean()
    assert_close(aux["moa_z_loss"], expected)


@pytest.mark.parametrize("share_kv", [False, True], ids=["expert_kv", "shared_kv"])
def test_parameter_names_and_shapes(share_kv: bool) -> None:
    E, H, Hk = 3, 4, 2
    config = make_config(H, Hk, num_experts=E, share_kv=share_kv)
    config.qkv_bias = config.o_bias = config.qk_norm = True
    kv = () if share_kv else (E,)
    expected = {
        "experts.q_proj": (E, H * Dh, D),
        "experts.k_proj": (*kv, Hk * Dh, D),
        "experts.v_proj": (*kv, Hk * Dh, D),
        "experts.o_proj": (E, D, H * Dh),
        "experts.q_proj_bias": (E, H * Dh),
        "experts.k_proj_bias": (*kv, Hk * Dh),
        "experts.v_proj_bias": (*kv, Hk * Dh),
        "experts.o_proj_bias": (E, D),
        "experts.q_norm.weight": (E, Dh),
        "experts.k_norm.weight": (*kv, Dh),
        "router.weight": (E, D),
    }
    with torch.device("meta"):
        moa = MixtureOfAttention(config, 0)
    assert {n: tuple(p.shape) for n, p in moa.named_parameters()} == expected


@pytest.mark.parametrize("kv_init", ["mean", "seed"])
def test_stack_attention_experts(kv_init: str) -> None:
    torch.manual_seed(5)
    config = make_config(extras="bias", num_experts=3)
    sources = [Attention(config).state_dict() for _ in range(3)]
    stacked = stack_attention_experts(sources, share_kv=False)
    for j, source in enumerate(sources):
        assert torch.equal(stacked["q_proj"][j], source["q_proj.weight"])
        assert torch.equal(stacked["v_proj_bias"][j], source["v_proj.bias"])
        assert torch.equal(stacked["o_proj"][j], source["o_proj.weight"])
    shared = stack_attention_experts(sources, share_kv=True, kv_init=kv_init)
    for name in ("k_proj.weight", "v_proj.bias"):
        tensors = torch.stack([source[name] for source in sources])
        expected = tensors.mean(0) if kv_init == "mean" else tensors[0]
        assert_close(shared[name.replace(".weight", "").replace(".bias", "_bias")], expected)
    assert torch.equal(shared["q_proj"], stacked["q_proj"])
    with pytest.raises(ValueError, match="same architecture"):
        stack_attention_experts([sources[0], {"q_proj.weight": sources[1]["q_proj.weight"]}], share_kv=False)


def test_wide_bf16_close_to_fp32_reference() -> None:
    torch.manual_seed(6)
    config = make_config(num_experts=3, share_kv=True)
    moa = MixtureOfAttention(config, 0)
    randomise(moa)
    inputs = make_inputs(config, padded=True)
    moa.implementation = "eager"
    reference_BSD, _ = moa(*inputs)
    moa.to(torch.bfloat16).implementation = "wide"
    out_BSD, _ = moa(*(t if t is None or t.dtype == torch.bool else t.bfloat16() for t in inputs))
    assert out_BSD.dtype == torch.bfloat16
    relative_error = (out_BSD.float() - reference_BSD).norm() / reference_BSD.norm()
    assert relative_error < 2e-2


class _WeightSizedWrites(TorchDispatchMode):
    """Records aten ops that write a tensor of at least `numel` elements (weight-sized copies)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops, self.inner_strides = numel, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        written = out[0] if isinstance(out, (tuple, list)) else out
        copying = func.overloadpacket in (
            torch.ops.aten.copy_,
            torch.ops.aten.cat,
            torch.ops.aten.clone,
            torch.ops.aten._to_copy,
        )
        if copying and isinstance(written, torch.Tensor) and written.numel() >= self.numel:
            self.ops.append(str(func.overloadpacket.__name__))
            if func.overloadpacket is torch.ops.aten.copy_:
                # (destination, source) innermost strides: 1 and 1 is a coalesced copy on a GPU;
                # a transposing copy reads (or writes) a whole row apart per element
                self.inner_strides.append((args[0].stride(-1), args[1].stride(-1)))
        return out


@pytest.mark.parametrize("master", ["bf16-weights", "fp32-weights-autocast"])
@pytest.mark.parametrize("extras", ["plain", "bias"])
@pytest.mark.parametrize("share_kv", [False, True], ids=["expert_kv", "shared_kv"])
def test_wide_weights_are_built_in_one_pass_in_the_gemm_dtype(
    share_kv: bool, extras: str, master: str
) -> None:
    """Each concatenated wide weight (W_q|W_k|W_v where the heads need reordering, W_o always)
    is written once, already in autocast's dtype: no permuted temporary, no separate cast, and
    no transpose (each head's Dh values are contiguous on both sides of the copy).
    Expert-KV without biases projects from views (no wide W_qkv at all). And the result is the
    eager loop's within bf16 rounding."""
    torch.manual_seed(8)
    config = make_config(4, 2, extras, num_experts=3, share_kv=share_kv)
    moa = MixtureOfAttention(config, 0)
    randomise(moa)
    inputs = make_inputs(config, padded=False)
    moa.implementation = "eager"
    reference_BSD, _ = moa(*inputs)
    bf16 = master == "bf16-weights"
    if bf16:
        moa.to(torch.bfloat16)
        inputs = tuple(t if t is None or t.dtype == torch.bool else t.bfloat16() for t in inputs)
    moa.implementation = "wide"
    weight_numel = moa.experts.o_proj.numel()
    recorder = _WeightSizedWrites(weight_numel)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not bf16), recorder:
        out_BSD, _ = moa(*inputs)
    if share_kv or extras == "bias":  # W_qkv and W_o: one copy each
        expected = ["copy_", "copy_"]
    else:  # W_o; W_q is a view, which autocast casts once (as it would any nn.Linear weight)
        expected = ["copy_"] if bf16 else ["_to_copy", "copy_"]
    assert sorted(recorder.ops) == expected, recorder.ops
    assert recorder.inner_strides == [(1, 1)] * expected.count("copy_")  # no transposing copy
    assert out_BSD.dtype == torch.bfloat16
    relative_error = (out_BSD.float() - reference_BSD).norm() / reference_BSD.norm()
    assert relative_error < 2e-2


@pytest.mark.parametrize("share_kv", [False, True], ids=["expert_kv", "shared_kv"])
def test_transformer_of_identical_attention_experts_equals_dense_model(share_kv: bool) -> None:
    """F7 end to end: a parallel-block model whose attentions became 3 identical experts."""
    torch.manual_seed(8)
    dense_config = make_config(4, 2, "qk_norm").model_copy(
        update={"block": "parallel", "num_hidden_layers": 2}
    )
    dense = Transformer(dense_config).double()
    randomise(dense)
    config = ModelConfig(**{**dense_config.model_dump(), "moa": {"num_experts": 3, "share_kv": share_kv}})
    model = Transformer(config).double()
    state = {name: t for name, t in dense.state_dict().items() if ".self_attn." not in name}
    for index, layer in enumerate(dense.model.layers):
        prefix = f"model.layers.{index}.self_attn."
        experts = stack_attention_experts([layer.self_attn.state_dict()] * 3, share_kv)
        state.update({prefix + "experts." + name: t for name, t in experts.items()})
        state[prefix + "router.weight"] = 2.0 * torch.randn(3, D, dtype=torch.float64)
    model.load_state_dict(state)
    input_ids_BS = torch.randint(0, config.vocab_size, (B, S))
    attention_mask_BS = torch.ones(B, S, dtype=torch.long)
    attention_mask_BS[0, :2] = 0
    expected = dense(input_ids_BS, attention_mask_BS).logits
    assert_close(model(input_ids_BS, attention_mask_BS).logits, expected, atol=1e-10, rtol=0)


def test_init_weights_keeps_qk_norm_at_one_and_biases_at_zero() -> None:
    config = make_config(4, 2, "qk_norm", num_experts=2)
    config.qkv_bias = True
    moa = init_weights(MixtureOfAttention(config, 0), std=0.02)
    assert torch.equal(moa.experts.q_norm.weight, torch.ones(2, Dh))
    assert torch.equal(moa.experts.k_proj_bias, torch.zeros(2, 2 * Dh))
    assert 0.01 < moa.experts.q_proj.std() < 0.03
