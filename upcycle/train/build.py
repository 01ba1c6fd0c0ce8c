"""Build the model to train, in one documented order (../shared/style.md, habit 2):

1. build: load a checkpoint folder in fp32 (master weights; bf16 is autocast's business), or
   initialise a fresh model from its seed;
2. freeze parameters by role (`optim.freeze_parameters`);
3. move to the device; with `precision: bf16-weights`, cast the weights to bf16, routers excepted
   (`cast_to_bf16_weights`);
4. activation checkpointing per block;
5. FSDP2 sharding (`distributed.shard_model`), one unit per block;
6. torch.compile per block.

Activation checkpointing and compilation wrap each block's `forward` in place rather than
wrapping the module, so parameter names (and therefore state dicts and checkpoints) stay the
native ones; the model code needs no hook for either.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from upcycle.checkpoint.loading import load_model
from upcycle.model.init import init_weights
from upcycle.model.router import router_parameter_ids
from upcycle.model.transformer import Transformer
from upcycle.train.config import ModelSource


def build_model(source: ModelSource) -> Transformer:
    """The model in fp32 on the CPU, in training mode."""
    if source.path is not None:
        model = load_model(source.path, dtype=torch.float32)
    else:
        assert source.config is not None
        model = init_weights(Transformer(source.config), std=source.init_std, seed=source.init_seed)
    return model.train()


def cast_to_bf16_weights(model: nn.Module) -> None:
    """`precision: bf16-weights`: every parameter in bf16 except the routers' weights (fp32).

    The optimiser then keeps its moments in bf16 too (AdamW's state takes its parameter's
    dtype): half the memory traffic of fp32 master weights in the optimiser step, no per-step
    casts of the weights and bf16 weight gradients. The price is precision: an update smaller
    than about 2^-8 of a weight is rounded away, so small learning rates train less well than
    with fp32 master weights (the default). Routers stay fp32, as their logits and softmax are
    (the issue's "bf16 weights with an fp32 router"): their gradients are small and their
    decisions discrete. Buffers (RoPE tables, counters) are not touched.
    """
    routers = router_parameter_ids(model)
    for parameter in model.parameters():
        if id(parameter) not in routers and parameter.is_floating_point():
            parameter.data = parameter.data.to(torch.bfloat16)


def _checkpointed(forward, *args, **kwargs):
    # Non-reentrant checkpointing keeps the RNG state for the recompute (sample_top1's noise is
    # drawn again identically) and handles the block's (tensor, dict) output.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    for block in model.model.layers:
        block.forward = functools.partial(_checkpointed, block.forward)


def compile_blocks(model: Transformer) -> None:
    """torch.compile each block (the repeated unit) and the final norm, keeping module names.

    The final norm is compiled for the same reason as the blocks' own: run eagerly, its fp32
    RMSNorm is about ten element-wise kernels over [B, S, D] forward and backward (about 0.6 ms
    of the Mixtral-shaped step on an H100, bench/RESULTS.md ninth round), one or two compiled.
    The embedding stays eager: its compiled backward would scatter-add with atomics, where
    torch's eager one sorts (deterministic)."""
    for block in model.model.layers:
        block.compile()
    model.model.norm.compile()


def parameter_count(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), as numbers of elements."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
