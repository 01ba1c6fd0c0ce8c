"""`drop`: Drop-Upcycling (Nakamura et al. 2025), methods.md §6.

Every expert starts as a copy of the dense FFN whose F intermediate neurons are put in the
expert's own random order (one permutation applied to the W_gate rows, W_up rows and W_down
columns, so on its own it changes nothing). Then n = ⌊r·F⌋ intermediate positions are
re-initialised: the entries there are replaced by draws from N(μ, σ²), where μ and σ are the mean
and the (unbiased) standard deviation of exactly the entries being replaced, per matrix. Every
non-FFN tensor is copied unchanged.

Choices, following the released code (Taishi-N324/Drop-Upcycling @a99f203,
`conversions/drop_upcycling.py`) unless said otherwise:
- n = ⌊r·F⌋ as the code's `int(F * r)`, but computed with a 1e-9 guard so that a ratio with no
  exact binary form (0.29·100 = 28.999…) still gives 29.
- `index_sets: per_expert` (default, §9.18): one set of n positions per expert, shared by gate,
  up and down, so n whole neurons are re-drawn. `per_matrix` reproduces the code, which draws an
  independent set for each matrix.
- Randomness is seeded per (seed, layer, expert), not drawn from one global stream as in the
  code, so an expert does not depend on the order of conversion: one generator gives the
  permutation and the index set(s), one per matrix gives its new entries.
- Defaults: the code's Mixtral setup (§6): 8 experts, topK-then-softmax top-2, Switch aux loss
  with α = 0.02, r = 0.5, router uniform with zero mean and std 0.02 (`torch_rand_002`).
- Arithmetic in fp32 (fp64 for fp64 sources); the code draws in fp32 and casts to bf16.

Exactness (§7): r = 0 is the permutation alone and reproduces the dense model exactly under TS
(F5); r > 0 changes the function on purpose (N9).

Shape letters: F dense (= expert) width, D model width.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from upcycle.recipes.base import (
    FFN_MATRIX,
    MoEParams,
    RouterInit,
    UpcycleRecipe,
    compute_dtype,
    dense_ffn_matrix,
)
from upcycle.recipes.registry import register

MATRICES: tuple[FFN_MATRIX, ...] = ("gate", "up", "down")


class DropRouterInit(RouterInit):
    """The Drop-Upcycling code's router: uniform, zero mean, std 0.02 (`torch_rand_002`)."""

    distribution: Literal["normal", "uniform"] = "uniform"


class DropParams(MoEParams):
    num_experts: int | None = Field(8, gt=0)
    aux_loss_coef: float = Field(0.02, ge=0)
    router_init: DropRouterInit = Field(default_factory=DropRouterInit)
    ratio: float = Field(0.5, description="r: fraction of intermediate neurons re-initialised per expert")
    index_sets: Literal["per_expert", "per_matrix"] = Field(
        "per_expert", description="one re-initialised set per expert, or one per matrix (the code)"
    )
    seed: int = Field(0, description="seeds permutations, index sets and new entries")

    @field_validator("ratio")
    @classmethod
    def _ratio_is_a_fraction(cls, ratio: float) -> float:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(
                f"must be the fraction of FFN neurons to re-draw, got {ratio}; choose a value in [0, 1]"
            )
        return ratio


def reinitialised_count(ratio: float, width: int) -> int:
    """n = ⌊r·F⌋, robust to binary rounding of r."""
    return min(width, math.floor(ratio * width + 1e-9))


def expert_generator(seed: int, layer: int, expert: int, stream: str) -> torch.Generator:
    """A generator that depends only on (seed, layer, expert, stream)."""
    digest = hashlib.sha256(f"drop/{seed}/{layer}/{expert}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass(frozen=True)
class ExpertPlan:
    """Order of the dense neurons in one expert, and the positions re-drawn in each matrix."""

    permutation_F: torch.Tensor
    positions: dict[FFN_MATRIX, torch.Tensor]


def expert_plan(seed: int, layer: int, expert: int, width: int, count: int, per_matrix: bool) -> ExpertPlan:
    generator = expert_generator(seed, layer, expert, "plan")
    permutation_F = torch.randperm(width, generator=generator)
    if per_matrix:
        positions = {which: torch.randperm(width, generator=generator)[:count] for which in MATRICES}
    else:
        shared = torch.randperm(width, generator=generator)[:count]
        positions = dict.fromkeys(MATRICES, shared)
    return ExpertPlan(permutation_F, positions)


def reinitialise(
    matrix: torch.Tensor, which: FFN_MATRIX, positions: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Replace rows (gate, up) or columns (down) `positions` by N(μ, σ²) of the entries replaced."""
    if positions.numel() == 0:
        return matrix
    rows_first = matrix if which != "down" else matrix.t()  # a view: writes go to `matrix`
    block = rows_first[positions]
    mean, std = block.mean(), block.std()
    noise = torch.randn(block.shape, generator=generator, dtype=matrix.dtype)
    rows_first[positions] = noise * std + mean
    return matrix


@register
class DropUpcycling(UpcycleRecipe):
    name = "drop"
    paper = "Nakamura et al. 2025, Drop-Upcycling, https://arxiv.org/abs/2502.19261"
    summary = "permuted copies of the dense FFN with a fraction r of neurons re-initialised (TS top-2)"
    Params: ClassVar = DropParams

    def plan(self, layer: int, expert: int) -> ExpertPlan:
        width = self.seed.config.intermediate_size
        p = self.params
        count = reinitialised_count(p.ratio, width)
        return expert_plan(p.seed, layer, expert, width, count, p.index_sets == "per_matrix")

    def expert_matrix(self, layer: int, which: FFN_MATRIX, expert: int) -> torch.Tensor:
        dense = dense_ffn_matrix(self.seed, layer, which)
        plan = self.plan(layer, expert)
        dtype = compute_dtype(dense.dtype)
        permuted = dense[:, plan.permutation_F] if which == "down" else dense[plan.permutation_F]
        permuted = permuted.to(dtype)  # indexing made a copy already
        generator = expert_generator(self.params.seed, layer, expert, which)
        return reinitialise(permuted, which, plan.positions[which], generator)
