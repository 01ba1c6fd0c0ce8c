"""torch.compile of the blocks (`train.compile: true`, `compile_blocks`): the compiled model
computes what the eager one does, forward and backward, for dense, MoE and BAM blocks; and the
MoE layer's grouped fast path traces into one graph in bf16 (no graph break, no host sync), as
it must for compiled training on a GPU. Runs on the CPU with inductor's C++ backend."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from upcycle.model import ModelConfig, Transformer
from upcycle.model.init import init_weights
from upcycle.train.build import compile_blocks

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
MOE = dict(num_experts=4, top_k=2, routing="topk_softmax", aux_loss="switch", aux_loss_coef=0.01)
CASES = {
    "dense": ModelConfig(**BASE),
    "moe": ModelConfig(**BASE, moe=MOE),
    "bam": ModelConfig(
        **BASE,
        block="parallel",
        moe={**MOE, "top_k": 1, "routing": "softmax_topk"},
        moa={"num_experts": 2, "share_kv": False, "routing": "soft"},
    ),
}


def _loss_and_grads(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(tokens)
    loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()
    )
    loss = loss + sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_blocks_equal_eager(case):
    torch._dynamo.reset()
    config = CASES[case]
    eager = init_weights(Transformer(config), seed=0).train()
    compiled = init_weights(Transformer(config), seed=0).train()
    compile_blocks(compiled)
    tokens = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_e, grads_e = _loss_and_grads(eager, tokens)
    loss_c, grads_c = _loss_and_grads(compiled, tokens)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("hidden_act", "gated"),
    [("silu", True), ("gelu", True), ("relu2", False)],
    ids=["swiglu", "geglu", "relu2"],
)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_grouped_moe_layer_traces_into_one_graph_in_bf16(dynamic, hidden_act, gated):
    """Forward and the written-out backward of every activation trace into one graph."""
    torch._dynamo.reset()
    config = ModelConfig(**{**BASE, "hidden_act": hidden_act}, moe={**MOE, "gated": gated})
    model = init_weights(Transformer(config), seed=0)
    layer = model.model.layers[0].mlp.to(torch.bfloat16)
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    assert layer.resolved_implementation(x.reshape(-1, 64)) == "grouped"
    with torch._dynamo.config.patch(assume_static_by_default=not dynamic):
        explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
