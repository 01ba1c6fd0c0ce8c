"""`btx`: Branch-Train-MiX (Sukhbaatar et al. 2024), methods.md §3.

Sources are N models branched from one seed (the seed itself may be one of them, as BTX's
"generalist" expert). Expert i of every MoE layer is the FFN of source i, copied exactly; every
other tensor (embeddings, norms, attention, LM head; a tied embedding once) is the uniform mean
over all sources (§3.2, §9.8), computed in fp32 (fp64 for fp64 sources) and cast back. New random
routers; defaults TS top-2 with BTX's own load-balancing form (`btx`: mean gate value × mean
probability, α = 0.01, §1.2, §9.9).

Ablations of §3.3, with S sources and C = `split_chunks`: `expert_layout: split` cuts each
source FFN into C experts of width F/C (N = S·C, no rescaling, as the paper); `blend` makes
expert n out of the n-th chunk of *every* source, concatenated (N = C experts of width S·F/C).

Exactness: with identical sources (no branch training) BTX reduces to sparse upcycling and is
exact (§7 F6); with real branches it equals no source (N6).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from upcycle.errors import UpcycleError
from upcycle.recipes.base import (
    FFN_MATRIX,
    MoEParams,
    SourceModel,
    UpcycleRecipe,
    compute_dtype,
    dense_ffn_matrix,
)
from upcycle.recipes.registry import register


class BTXParams(MoEParams):
    aux_loss: Literal["switch", "btx", "none"] = "btx"
    expert_layout: Literal["whole", "split", "blend"] = "whole"
    split_chunks: int = Field(1, gt=0, description="chunks per source FFN for split / blend")


MEAN_BLOCK_BYTES = 8 * 1024**2


def mean_of_sources(sources, name: str) -> torch.Tensor:
    """Uniform mean of one tensor over all sources, accumulated in fp32 (fp64 when source 0 is
    fp64) and cast to source 0's dtype: out = (s_0 + s_1 + ... + s_{N-1}) / N, summed in source
    order, each source entering the sum in its own precision.

    Rows are processed in blocks of about 8 MB of accumulator: each source's rows are read
    straight into a reused buffer of its dtype and added in place, so memory stays at the output
    tensor plus a few small buffers, however many sources there are, and no fresh memory is
    touched per block (bench/RESULTS.md, conversion: fresh pages are what made this slow)."""
    shape = sources[0].shape(name)
    dtype = sources[0].dtype_of(name)
    acc_dtype = compute_dtype(dtype)
    out = torch.empty(shape, dtype=dtype)
    if out.numel() == 0:
        return out
    flat_out = out.view(shape[0] if len(shape) else 1, -1)
    rows, width = flat_out.shape
    step = max(1, min(rows, MEAN_BLOCK_BYTES // max(1, width * acc_dtype.itemsize)))
    total = torch.empty((step, width), dtype=acc_dtype)
    source_dtypes = [source.dtype_of(name) for source in sources]
    buffers = {d: torch.empty((step, width), dtype=d) for d in set(source_dtypes)}  # reused reads
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        acc = total[: stop - start]
        for index, (source, source_dtype) in enumerate(zip(sources, source_dtypes, strict=True)):
            part = buffers[source_dtype][: stop - start]
            if len(shape) == 0:
                source.read_into(name, part.view(()))
            else:
                source.read_into(name, part.view(stop - start, *shape[1:]), start, stop)
            if index == 0:
                acc.copy_(part)
            else:
                acc.add_(part)
        acc.div_(len(sources))
        flat_out[start:stop].copy_(acc)
    return out


def chunk(matrix: torch.Tensor, which: FFN_MATRIX, index: int, chunks: int) -> torch.Tensor:
    """Chunk `index` of `chunks` along the FFN width (rows of gate/up, columns of down)."""
    width = matrix.shape[1] if which == "down" else matrix.shape[0]
    size = width // chunks
    return (
        matrix[:, index * size : (index + 1) * size]
        if which == "down"
        else matrix[index * size : (index + 1) * size]
    )


@register
class BranchTrainMix(UpcycleRecipe):
    name = "btx"
    paper = "Sukhbaatar et al. 2024, Branch-Train-MiX, https://arxiv.org/abs/2403.07816"
    summary = "FFNs of N domain branches become experts; everything else averaged; new router"
    Params: ClassVar = BTXParams
    min_sources = 2
    max_sources = None

    def chunks(self) -> int:
        return 1 if self.params.expert_layout == "whole" else self.params.split_chunks

    def num_experts(self) -> int:
        S, C, layout = len(self.sources), self.chunks(), self.params.expert_layout
        count = C if layout == "blend" else S * C
        if self.params.num_experts not in (None, count):
            raise UpcycleError(
                f"btx with expert_layout {layout} makes {count} experts; remove num_experts or set it to {count}"
            )
        return count

    def moe_section(self):
        section = super().moe_section()
        if self.chunks() > 1:
            width = self.seed.config.intermediate_size
            if width % self.chunks():
                raise UpcycleError(
                    f"split_chunks ({self.chunks()}) must divide intermediate_size ({width}); pick a divisor"
                )
            blend = self.params.expert_layout == "blend"
            section.intermediate_size = width // self.chunks() * (len(self.sources) if blend else 1)
        return section

    def validate(self) -> None:
        super().validate()
        if self.params.expert_layout != "whole" and self.params.split_chunks < 2:
            raise UpcycleError(f"expert_layout {self.params.expert_layout} needs split_chunks ≥ 2")

    def shared_tensor(self, name: str) -> torch.Tensor:
        return mean_of_sources(self.sources, name)

    def expert_source(self, layer: int, which: FFN_MATRIX, expert: int) -> SourceModel | None:
        return self.sources[expert] if self.params.expert_layout == "whole" else None

    def expert_matrix(self, layer: int, which: FFN_MATRIX, expert: int) -> torch.Tensor:
        C = self.chunks()
        if self.params.expert_layout == "whole":
            return dense_ffn_matrix(self.sources[expert], layer, which)
        if self.params.expert_layout == "split":  # expert = source · C + chunk
            source, part = divmod(expert, C)
            return chunk(dense_ffn_matrix(self.sources[source], layer, which), which, part, C)
        return self._blend(layer, which, expert)

    def _blend(self, layer: int, which: FFN_MATRIX, expert: int) -> torch.Tensor:
        """Blend layout: expert n = chunk n of every source, concatenated along the width."""
        pieces = [
            chunk(dense_ffn_matrix(s, layer, which), which, expert, self.chunks()) for s in self.sources
        ]
        return torch.cat(pieces, dim=1 if which == "down" else 0)
