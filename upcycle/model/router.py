"""The MoE router and the routing functions of methods.md §1.1, plus capacity (§1.3).

A router is a linear map D → E without bias. Its logits, softmax and top-k run in fp32 whatever
the model dtype (fp64 for an fp64 model, so that the exactness tests of methods.md §7 stay
exact), with autocast switched off so that a bf16 autocast region cannot lower them. A bf16
input on a GPU gets its fp32 logits from bf16 tensor-core GEMMs over exact bf16 splits of the
weight (`upcycle.kernels.router_gemm`) instead of an upcast copy and an fp32 GEMM: exact
products, summed in the tensor cores' accumulator (within about 2e-6 of fp64 on an H100).

Routing functions (all return a `Routing`):

| function | definition | K |
|---|---|---|
| `topk_softmax` (TS) | I = select_top_k(l, k); w = softmax(l_I) | k |
| `softmax_topk` (ST) | p = softmax(l); I = select_top_k(p, k); w = p_I, divided by Σ p_I if `renormalize` | k |
| `soft` | w = softmax(l) over all experts | E |
| `sample_top1` | training: y = softmax((l + g)/τ), g ~ Gumbel; keep argmax y with weight max y; inference: the Gumbel-max (hard) sample with weight 1 | 1 |

τ = max(0.5, exp(-r·t)) with r = 1e-4 (methods.md §9.10: the printed max(0.5, -r·t) is constant);
the step t is the router's `step` buffer, set by the trainer through `set_step`.

`select_top_k` is torch.topk with its ties defined: equal scores go in the order of their expert
index, the lower first. That order decides which replica a tie leaves out, and NVIDIA's
virtual-group router initialisation makes every expert of a group tie exactly (methods.md §5.2):
top-T must take whole groups, which any value order with index tie-breaks does, the same way
eagerly and compiled, on every device (torch.topk leaves the order of equal values to the kernel).

Capacity (`capacity_keep_mask`): each expert keeps its `capacity` assignments with the largest
router probability p = softmax(l) (the one score every routing function shares); ties keep the
earlier token. No host synchronisation: two stable sorts and a scatter.

Shape letters: T tokens, D model width, E experts, K experts per token, A = T·K assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.kernels import router_gemm
from upcycle.kernels.dispatch import expert_counts


@dataclass
class Routing:
    """What the experts and the losses need from one routing decision.

    weights_TK: combine weight of each chosen expert (router dtype); indices_TK: chosen experts,
    unique per token; probs_TE: the full softmax(logits); logits_TE: the raw router logits.
    """

    weights_TK: torch.Tensor
    indices_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor


def select_top_k(scores_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores of each row and their columns, largest first, equal scores in
    column order (NaN above everything, as torch's sort puts it): (values_TK, indices_TK).

    Eagerly one stable descending sort. Compiled (a graph of a block), k rounds of argmax (which
    takes the first of equal maxima), each masking the column it took: inductor fuses them with
    the softmax around them into one kernel, where torch.topk stays two kernels of its own
    (gatherTopK + bitonic sort, 0.30 ms in the Mixtral step: bench/RESULTS.md, tenth round).
    The rounds compare in fp64, where a taken column is -inf and a score of -inf is -DBL_MAX
    (below every finite fp32 score, above a taken one), so the order is the sort's exactly for
    every score dtype up to fp32; fp64 scores take the sort.
    """
    if not 0 < k <= scores_TE.shape[-1]:
        raise ValueError(f"select_top_k needs 0 < k <= {scores_TE.shape[-1]} (the number of scores), got {k}")
    if not torch.compiler.is_compiling() or scores_TE.dtype == torch.float64:
        with torch.no_grad():  # autograd keeps the [T, k] indices of the gather, not the whole sort
            order_TE = torch.argsort(scores_TE, dim=-1, descending=True, stable=True)
            indices_TK = order_TE[..., :k].contiguous()
        return scores_TE.gather(-1, indices_TK), indices_TK
    key_TE = scores_TE.double().masked_fill(scores_TE == -math.inf, -torch.finfo(torch.float64).max)
    columns_E = torch.arange(scores_TE.shape[-1], device=scores_TE.device)
    indices = []
    for _ in range(k):
        index_T1 = key_TE.argmax(dim=-1, keepdim=True)
        indices.append(index_T1)
        key_TE = key_TE.masked_fill(columns_E == index_T1, -math.inf)
    indices_TK = torch.cat(indices, dim=-1)
    return scores_TE.gather(-1, indices_TK), indices_TK


def topk_softmax(logits_TE: torch.Tensor, top_k: int) -> Routing:
    """TS (Mixtral, BTX): softmax over the k largest logits only."""
    top_logits_TK, indices_TK = select_top_k(logits_TE, top_k)
    weights_TK = torch.softmax(top_logits_TK, dim=-1)
    return Routing(weights_TK, indices_TK, torch.softmax(logits_TE, dim=-1), logits_TE)


def softmax_topk(logits_TE: torch.Tensor, top_k: int, renormalize: bool = False) -> Routing:
    """ST (Switch, NVIDIA, BAM's FFN): the k largest full-softmax probabilities, as they are."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK, indices_TK = select_top_k(probs_TE, top_k)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return Routing(weights_TK, indices_TK, probs_TE, logits_TE)


def soft(logits_TE: torch.Tensor) -> Routing:
    """Every expert, weighted by the full softmax (BAM's attention, BTX's soft ablation)."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    T, E = probs_TE.shape
    indices_TK = torch.arange(E, device=probs_TE.device).expand(T, E)
    return Routing(probs_TE, indices_TK, probs_TE, logits_TE)


def sample_top1_temperature(step: torch.Tensor | float, decay: float = 1e-4) -> torch.Tensor:
    """τ = max(0.5, exp(-decay · step)) (methods.md §1.1, §9.10)."""
    step_t = torch.as_tensor(step).to(torch.float64)
    return torch.clamp(torch.exp(-decay * step_t), min=0.5)


def gumbel_noise(like_TE: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel samples: -log(Exponential(1))."""
    return -torch.empty_like(like_TE).exponential_().log()


def sample_top1(
    logits_TE: torch.Tensor,
    temperature: torch.Tensor | float,
    training: bool,
    gumbel_TE: torch.Tensor | None = None,
) -> Routing:
    """BTX's Sample top-1 (methods.md §1.1): Gumbel-softmax in training, hard sample in inference.

    Training keeps only the largest entry of the soft sample y = softmax((l + g)/τ) and weights
    its expert by that entry, so the router learns through y. Inference uses the Gumbel-max
    sample argmax(l + g), a draw from softmax(l), with weight 1. `gumbel_TE` fixes the noise
    (tests); by default it is drawn fresh.
    """
    noisy_TE = logits_TE + (gumbel_noise(logits_TE) if gumbel_TE is None else gumbel_TE)
    if training:
        sample_TE = torch.softmax(noisy_TE / temperature, dim=-1)
        weights_TK, indices_TK = sample_TE.max(dim=-1, keepdim=True)
    else:
        indices_TK = noisy_TE.argmax(dim=-1, keepdim=True)
        weights_TK = torch.ones_like(indices_TK, dtype=logits_TE.dtype)
    return Routing(weights_TK, indices_TK, torch.softmax(logits_TE, dim=-1), logits_TE)


class Router(nn.Module):
    """Linear D → E router (`weight` [E, D], no bias, N(0, 0.02²) init as methods.md §9.11).

    The weight keeps the model's storage dtype (a bf16 checkpoint stays bf16); the computation
    is upcast. `step` is a non-persistent buffer (it is not part of checkpoints) that only
    sample_top1 reads.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        routing: str,
        top_k: int,
        renormalize: bool = False,
        sample_top1_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        self.num_experts, self.routing, self.top_k = num_experts, routing, top_k
        self.renormalize, self.sample_top1_decay = renormalize, sample_top1_decay
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # int64: `model.to(torch.bfloat16)` casts floating buffers, and bf16 cannot count steps.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)
        self.step.zero_()

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        """Training step t for the sample_top1 temperature (a tensor, so no recompilation)."""
        self.step.fill_(step)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if router_gemm.applies(x_TD, self.weight):
            # bf16 input on a GPU: fp32 logits from bf16 tensor-core GEMMs
            flat = router_gemm.router_logits(x_TD.reshape(-1, x_TD.shape[-1]), self.weight)
            return flat.view(*x_TD.shape[:-1], self.num_experts)
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.to(dtype), self.weight.to(dtype))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        if self.routing == "topk_softmax":
            return topk_softmax(logits_TE, self.top_k)
        if self.routing == "softmax_topk":
            return softmax_topk(logits_TE, self.top_k, self.renormalize)
        if self.routing == "soft":
            return soft(logits_TE)
        if self.routing == "sample_top1":
            tau = sample_top1_temperature(self.step, self.sample_top1_decay).to(logits_TE.dtype)
            return sample_top1(logits_TE, tau, self.training)
        raise ValueError(f"unknown routing {self.routing!r}")


def expert_capacity(num_tokens: int, top_k: int, capacity_factor: float, num_experts: int) -> int:
    """ceil(T·K·CF/N), Megatron's per-expert capacity (methods.md §1.3, §9.13)."""
    return math.ceil(num_tokens * top_k * capacity_factor / num_experts)


def capacity_keep_mask(probs_TE: torch.Tensor, indices_TK: torch.Tensor, capacity: int) -> torch.Tensor:
    """Boolean [T, K]: True for the assignments each expert keeps (its `capacity` most probable)."""
    T, K = indices_TK.shape
    E = probs_TE.shape[-1]
    expert_A = indices_TK.reshape(-1)
    prob_A = probs_TE.gather(1, indices_TK).reshape(-1)
    by_prob_A = torch.argsort(prob_A, descending=True, stable=True)
    order_A = by_prob_A[torch.argsort(expert_A[by_prob_A], stable=True)]
    counts_E = expert_counts(indices_TK, E)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_expert_A = expert_A[order_A]
    rank_in_expert_A = torch.arange(T * K, device=expert_A.device) - starts_E[sorted_expert_A]
    keep_A = torch.empty(T * K, dtype=torch.bool, device=expert_A.device)
    keep_A.scatter_(0, order_A, rank_in_expert_A < capacity)
    return keep_A.view(T, K)


def router_parameter_ids(module: nn.Module) -> set[int]:
    """ids of the parameters of every `Router` inside `module` (its MoE and MoA routers)."""
    return {id(p) for m in module.modules() if isinstance(m, Router) for p in m.parameters()}
