"""The process group, the device, FSDP2 sharding, and the few collectives the trainer uses.

Launch: one process is a normal run; under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT in the environment) the trainer joins a process group: NCCL on GPUs (one per
process, `cuda:LOCAL_RANK`), gloo on CPU. If the caller already initialised a group, it is used
and left open.

Parallelism is FSDP2 data parallelism (`fully_shard`): every block is one FSDP unit and the root
(embeddings, final norm, LM head) another, as torchtitan does; parameters stay sharded between
forward passes and gradients are reduce-scattered (averaged) over ranks. Module names do not
change, so state dicts keep the native names. Each rank builds the whole model before sharding
it, which bounds model size by one rank's memory at start-up; meta-device initialisation is a
later step.

Expert parallelism (`parallel.expert_parallel` > 1) changes only the routed experts of MoE
layers: they are sharded over EP groups and FSDP2-sharded over the remaining ranks, on a 2-D
(dp, ep) mesh; see `upcycle.train.expert_parallel`.

`fully_shard` lives in `torch.distributed.fsdp` since torch 2.6 and in
`torch.distributed._composable.fsdp` before; both are tried.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from upcycle.model.router import Router, router_parameter_ids


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


@dataclass
class Distributed:
    """This process's place in the run: rank, world size, device; collectives that are no-ops
    (or identities) in a one-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available()
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        owns_group = False
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns_group = True
        return cls(rank, world_size, local_rank, device, owns_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, value: int) -> int:
        if not self.active:
            return value
        tensor = torch.tensor([value], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` as a list on rank 0; None elsewhere."""
        if not self.active:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def scatter_objects(self, objects: list[Any] | None) -> Any:
        """Element `rank` of rank 0's list on each rank."""
        if not self.active:
            return objects[0] if objects else None
        received = [None]
        dist.scatter_object_list(received, objects if self.is_main else None, src=0)
        return received[0]


def shard_model(model: nn.Module, distributed: Distributed, expert_parallel: int = 1) -> nn.Module:
    """FSDP2 over `distributed`'s ranks: one unit per block, then the root; a no-op for one rank.

    `expert_parallel` > 1: the routed experts are sharded over groups of that many ranks first
    (`upcycle.train.expert_parallel.shard_model_expert_parallel`).
    """
    if not distributed.active:
        return model
    if expert_parallel > 1:
        from upcycle.train.expert_parallel import shard_model_expert_parallel

        return shard_model_expert_parallel(
            model, distributed.device.type, distributed.world_size, expert_parallel
        )
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    mesh = init_device_mesh(distributed.device.type, (distributed.world_size,))
    for block in model.model.layers:
        shard_block(block, mesh, fully_shard)
    fully_shard(model, mesh=mesh)
    return model


def shard_block(block: nn.Module, mesh, fully_shard) -> None:
    """One FSDP2 unit for `block`. FSDP2 wants one parameter dtype per unit, so where the block
    mixes dtypes (`precision: bf16-weights` keeps the routers in fp32) each router whose dtype
    differs from the block's other parameters becomes a unit of its own first."""
    routers = [m for m in block.modules() if isinstance(m, Router)]
    in_routers = router_parameter_ids(block)
    others = {p.dtype for p in block.parameters() if id(p) not in in_routers}
    for router in routers:
        if {p.dtype for p in router.parameters()} - others:
            fully_shard(router, mesh=mesh)
    fully_shard(block, mesh=mesh)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP2's reduce-scatter on all but the last micro-batch of a step."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)
