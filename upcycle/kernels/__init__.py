"""Fast paths, each tested against the eager reference in `upcycle.model` (design.md, "Speed").

- `grouped_moe`: routed experts as two grouped GEMMs over expert-sorted tokens
  (`torch._grouped_mm` where it runs natively), without host synchronisation.
- `wide_attention`: BAM's attention experts as one attention with E·H query heads.
- `swiglu`, `combine`: the element-wise steps between those GEMMs (SwiGLU forward and backward,
  gather-sums over each token's rows, row scaling) as Triton kernels on the GPU, each with the
  torch version used everywhere else.
- `moe_ops`: the SwiGLU expert path as custom operators, so compiled graphs run it as eager does.
- `gather_gemm`: grouped GEMMs that read token rows by index (opt-in `grouped_moe.GATHER_GEMM`,
  Triton), removing the expert path's three row gathers.
- `adamw`: AdamW's update of a large tensor in one Triton pass (`upcycle.train.optim.AdamW`).
- `dispatch`: assignments per expert and the expert-sorted permutation (narrow radix-sort keys).
- `host_copy`: small device tensors copied to the host without stalling the GPU's queue.
- `dtypes`: the dtype a matrix product runs in under autocast.

Kernels take plain tensors and callables, never model modules or configs, so that `model/` can
import them and not the other way round. This package imports nothing eagerly.
"""
