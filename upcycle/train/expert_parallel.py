"""Expert parallelism (EP): each rank holds E/ep experts of every MoE layer, tokens travel to them.

Layout. The world (W ranks, W % ep == 0) is a 2-D device mesh `(dp, ep)` = (W/ep, ep), ranks in
row-major order, so ranks r and r+1 are EP neighbours (on one node, as they should be). Every
rank still reads its own slice of the global batch: EP borrows ranks from data parallelism, it
does not replace it (as in DeepSpeed-MoE and torchtitan). For each MoE layer:

| parameters | held as | FSDP2 shards them over | gradient reduced over |
|---|---|---|---|
| `mlp.experts.gate_up_proj` / `up_proj` [E, P, D], `mlp.experts.down_proj` [E, D, F] | a DTensor, `Shard(0)` over `ep`: EP rank e holds experts e·E/ep .. (e+1)·E/ep − 1 | `dp` only (dim 1 when it divides, else dim 0) | `dp` only (and `ep` by the all-to-all) |
| everything else: attention, norms, embeddings, the router, shared experts | as without EP | the whole world, one unit per block and the root | the whole world |

Forward of one MoE layer (`ExpertDispatch`): the router runs on this rank's tokens as usual
(replicated router, unchanged routing, capacity and aux losses). The T·K assignments are sorted
by expert, which groups them by owning rank; per-expert counts are exchanged with one
`all_to_all_single` (ints), then the token rows go out with `all_to_all_single` using those
split sizes, the owner runs its local experts on what it received (the eager loop or the
grouped GEMMs, as the layer's `implementation` says), the outputs come back with the reverse
all-to-all and are combined with the routing weights, exactly as the local grouped path does.
Both all-to-alls are autograd-aware (`_AllToAll`: the backward is the all-to-all with the split
sizes swapped), so gradients reach the token rows and the expert weights. One host read of the
counts per layer and forward call; none in the backward.

Why the losses equal a one-process run on the same micro-batches:
- the router, the aux losses (load balancing over all E experts and all tokens of the forward
  call, z-loss) and the expert loads are computed from this rank's routing before any dispatch,
  with the statistics of every expert, not only of the local ones: the same numbers as one
  process computing the same micro-batch. (The trainer's convention is per forward call, see
  `upcycle.train.losses`; pooling router statistics over EP ranks would change the loss relative
  to the same micro-batches on one process, so it is not done.)
- gradients: an expert's owner receives Σ over its EP group's ranks of ∂loss_r/∂W through the
  all-to-all backward, and FSDP2 then averages over `dp`; the mean over all W ranks that every
  other parameter gets needs one more factor 1/ep, applied in the backward of the weights
  (`_ScaleGrad`; ep is a power of two in practice, so this is exact).

Checkpoints need nothing special: `get_model_state_dict(full_state_dict=True)` calls
`full_tensor()` on the (dp, ep) DTensors, so the saved tensors are the full [E, ...] stacks
under the usual names, and `set_model_state_dict(..., broadcast_from_rank0=True)` cuts a full
tensor into any (dp, ep) layout. A checkpoint saved at one world size and ep loads at another.

Gradient norm and clipping: the gradients live on two meshes (the world and (dp, ep)), which
one `torch.stack` of DTensors cannot mix; `grad_norm` and `clip_grads` group them by mesh.

Requirements and limits: gloo (CPU) and NCCL both provide `all_to_all_single`; one expert count
for every MoE layer; BAM's attention experts are not sharded by EP (they stay FSDP-sharded
with the rest of the block).

Shape letters: T tokens, D model width, E experts (L of them local), K experts per token,
A = T·K assignments, R rows received by this rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from upcycle.kernels import grad_norm as fused_grad_norm
from upcycle.kernels.dispatch import expert_counts, sort_by_expert
from upcycle.model.moe import Experts, MoE, eager_experts


@dataclass(frozen=True)
class ExpertParallelMeshes:
    """The meshes of an EP run: (dp, ep) for experts and the 1-D world mesh for the rest."""

    experts: object  # DeviceMesh (dp, ep)
    world: object  # DeviceMesh (world,)

    @property
    def ep(self) -> int:
        return self.experts["ep"].size()

    @property
    def dp(self) -> int:
        return self.experts["dp"].size()


def expert_parallel_meshes(device_type: str, world_size: int, ep: int) -> ExpertParallelMeshes:
    """The (dp, ep) mesh and the world mesh; every rank must call this, in the same order."""
    from torch.distributed.device_mesh import init_device_mesh

    if ep < 1 or world_size % ep:
        raise ValueError(f"expert_parallel {ep} must divide the world size {world_size}")
    experts = init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("dp", "ep"))
    world = init_device_mesh(device_type, (world_size,), mesh_dim_names=("world",))
    return ExpertParallelMeshes(experts, world)


class _AllToAll(torch.autograd.Function):
    """Rows of `x` to the ranks of `group`: `input_splits[r]` rows go to rank r, `output_splits[r]`
    rows come from rank r. The backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware `all_to_all_single` along dim 0 (see `_AllToAll`)."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an expert stack (a DTensor's local tensor, differentiably)."""
    return weight.to_local() if hasattr(weight, "to_local") else weight


class ExpertDispatch:
    """`Experts.dispatch` for one EP group: all-to-all out, local experts, all-to-all back.

    `grad_scale` multiplies the gradient of the local expert weights (1/ep in training; see the
    module docstring). The expert weights may be plain tensors holding the local experts or
    DTensors sharded over the EP mesh dimension.
    """

    def __init__(self, group, ep: int, grad_scale: float = 1.0) -> None:
        self.group, self.ep, self.grad_scale = group, ep, grad_scale

    @torch.compiler.disable  # data-dependent split sizes and DTensor locals: run it eagerly
    def __call__(
        self,
        experts: Experts,
        x_TD: torch.Tensor,
        weights_TK: torch.Tensor,
        indices_TK: torch.Tensor,
        implementation: str,
    ) -> torch.Tensor:
        w_in_LPD, w_down_LDF = _local(experts.w_in_EPD), _local(experts.down_proj)
        if self.grad_scale != 1.0:
            w_in_LPD = _ScaleGrad.apply(w_in_LPD, self.grad_scale)
            w_down_LDF = _ScaleGrad.apply(w_down_LDF, self.grad_scale)
        # Under autocast the experts compute in the autocast dtype (as `Experts.forward` does).
        w_in_LPD, w_down_LDF = w_in_LPD.to(x_TD.dtype), w_down_LDF.to(x_TD.dtype)
        ep, L = self.ep, w_in_LPD.shape[0]
        T, K = indices_TK.shape
        D = x_TD.shape[-1]

        # Assignments sorted by expert are grouped by owning rank, then by local expert.
        expert_A = indices_TK.reshape(-1)
        order_A, inverse_A = sort_by_expert(expert_A, ep * L)
        send_counts_E = expert_counts(indices_TK, ep * L)
        recv_counts_E = torch.empty_like(send_counts_E)  # [source rank, local expert], flattened
        dist.all_to_all_single(recv_counts_E, send_counts_E, group=self.group)
        counts = torch.stack([send_counts_E, recv_counts_E]).view(2, ep, L).cpu()  # the one host read
        send_splits, recv_splits = counts.sum(-1).tolist()

        # An expand + permutation rather than index_select(order_A // K): its backward is a
        # permutation and a sum over K, never a scatter-add with repeated indices.
        x_AD = x_TD.unsqueeze(1).expand(T, K, D).reshape(T * K, D).index_select(0, order_A)
        x_RD = all_to_all(x_AD, recv_splits, send_splits, self.group)
        local_R = torch.repeat_interleave(
            torch.arange(L, device=x_TD.device).repeat(ep), recv_counts_E, output_size=sum(recv_splits)
        )
        ones_R1 = torch.ones(x_RD.shape[0], 1, dtype=x_RD.dtype, device=x_RD.device)
        run = _run_experts(implementation)
        y_RD = run(x_RD, ones_R1, local_R.unsqueeze(1), w_in_LPD, w_down_LDF, experts.act, experts.gated)
        y_AD = all_to_all(y_RD, send_splits, recv_splits, self.group)
        y_TKD = y_AD.index_select(0, inverse_A).view(T, K, D)
        return (y_TKD * weights_TK.unsqueeze(-1)).sum(dim=1)


def _run_experts(implementation: str) -> Callable[..., torch.Tensor]:
    if implementation == "grouped":
        from upcycle.kernels.grouped_moe import grouped_moe

        return grouped_moe
    return eager_experts


def moe_layers(model: nn.Module) -> list[MoE]:
    return [module for module in model.modules() if isinstance(module, MoE)]


def distribute_experts(model: nn.Module, ep_mesh, grad_scale: float | None = None) -> None:
    """Replace every MoE layer's expert stacks by DTensors sharded over `ep_mesh` (`Shard(0)`),
    keeping this rank's E/ep experts, and route the layer's experts through `ExpertDispatch`.

    Every rank must hold the same full weights before the call (they are built identically).
    `grad_scale`: see `ExpertDispatch`; default 1/ep.
    """
    from torch.distributed.tensor import DTensor, Shard

    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    group = ep_mesh.get_group()
    dispatch = ExpertDispatch(group, ep, 1.0 / ep if grad_scale is None else grad_scale)
    for moe in moe_layers(model):
        experts = moe.experts
        for name in ("gate_up_proj" if experts.gated else "up_proj", "down_proj"):
            full = getattr(experts, name)
            E = full.shape[0]
            if E % ep:
                raise ValueError(f"expert_parallel {ep} does not divide the {E} experts of an MoE layer")
            local = full.detach()[rank * (E // ep) : (rank + 1) * (E // ep)].clone()
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.dispatch = dispatch


def _expert_placement(dp: int):
    """FSDP2's placement for a local expert stack: dim 1 when dp divides it, else dim 0."""
    from torch.distributed.tensor import Shard

    def placement(parameter: nn.Parameter):
        local = _local(parameter)
        return Shard(1) if local.ndim > 1 and local.shape[1] % dp == 0 else Shard(0)

    return placement


def shard_model_expert_parallel(model: nn.Module, device_type: str, world_size: int, ep: int) -> nn.Module:
    """EP over `ep` ranks composed with FSDP2: experts over dp, everything else over the world."""
    from upcycle.train.distributed import _fully_shard, shard_block

    fully_shard = _fully_shard()
    meshes = expert_parallel_meshes(device_type, world_size, ep)
    distribute_experts(model, meshes.experts["ep"])
    for moe in moe_layers(model):
        fully_shard(moe.experts, mesh=meshes.experts["dp"], shard_placement_fn=_expert_placement(meshes.dp))
    for block in model.model.layers:
        shard_block(block, meshes.world, fully_shard)
    fully_shard(model, mesh=meshes.world)
    return model


def _by_mesh(parameters: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Group tensors by DTensor mesh (plain tensors together), in first-seen order."""
    groups: dict[object, list[torch.Tensor]] = {}
    for tensor in parameters:
        groups.setdefault(getattr(tensor, "device_mesh", None), []).append(tensor)
    return list(groups.values())


def _sharded_over_all_ranks(grads: list[torch.Tensor]) -> bool:
    """Every gradient a DTensor whose placements are all shards: each element lives on one rank."""
    from torch.distributed.tensor import DTensor, Shard

    return all(isinstance(g, DTensor) and all(isinstance(p, Shard) for p in g.placements) for g in grads)


def grad_norm(parameters: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The global L2 norm of the gradients of `parameters`, as a plain tensor.

    Plain gradients on one GPU take `upcycle.kernels.grad_norm.total_norm` (one pass over each
    large tensor, fp64 partial sums: at least as accurate as torch's). Other gradients on one mesh (FSDP2 without EP) take exactly the path of
    `torch.nn.utils.get_total_norm` + `full_tensor()`. Gradients on several meshes (EP: the
    world and (dp, ep)) that are sharded with no replica, as FSDP2 and EP leave them, add the
    squares of their local shards and sum those over all ranks with one all-reduce.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    if fused_grad_norm.supports(grads):  # plain tensors on one GPU: large ones read once each
        return fused_grad_norm.total_norm(grads)
    groups = _by_mesh(grads)
    if len(groups) == 1:
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not _sharded_over_all_ranks(grads):
        raise ValueError("gradients on several meshes must be DTensors sharded over every rank")
    local = torch.nn.utils.get_total_norm([g.to_local() for g in grads], norm_type=2.0)
    squared = local.square()
    dist.all_reduce(squared, op=dist.ReduceOp.SUM)
    return squared.sqrt()


def clip_grads(parameters: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """`torch.nn.utils.clip_grads_with_norm_`, one call per mesh."""
    for group in _by_mesh([p for p in parameters if p.grad is not None]):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm)
