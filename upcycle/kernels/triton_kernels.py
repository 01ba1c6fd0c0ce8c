"""The Triton kernels behind `upcycle.kernels.swiglu` and `upcycle.kernels.combine`.

Imported only when a CUDA tensor first needs one (or by the tests, under Triton's CPU
interpreter), so that upcycle itself never requires Triton. What each kernel computes, and its
torch twin, is documented where it is called.
"""

import triton
import triton.language as tl


@triton.jit
def swiglu_forward_kernel(h_ptr, a_ptr, F, stride_h, stride_a, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + F + cols, mask=mask, other=0.0).to(tl.float32)
    a = gate * tl.sigmoid(gate) * up
    tl.store(a_ptr + row * stride_a + cols, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_backward_kernel(
    h_ptr, d_ptr, w_ptr, dh_ptr, dw_ptr, aw_ptr, F, stride_h, stride_d, stride_dh, stride_aw,
    BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for block in range(NUM_BLOCKS):  # a constant trip count (one compilation per width F)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + F + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        a = silu * up
        acc += d * a
        da = d * w
        dgate = da * up * sig * (1.0 + gate * (1.0 - sig))
        out_ty = dh_ptr.dtype.element_ty
        tl.store(dh_ptr + row * stride_dh + cols, dgate.to(out_ty), mask=mask)
        tl.store(dh_ptr + row * stride_dh + F + cols, (da * silu).to(out_ty), mask=mask)
        tl.store(aw_ptr + row * stride_aw + cols, (a * w).to(aw_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def gather_sum_kernel(
    src_ptr, index_ptr, w_ptr, out_ptr, D, stride_src, stride_out,
    K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(index_ptr + token * K + k).to(tl.int64)
        value = tl.load(src_ptr + row * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            value = value * tl.load(w_ptr + token * K + k).to(tl.float32)
        acc += value
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_rows_backward_kernel(
    dy_ptr, x_ptr, s_ptr, dx_ptr, ds_ptr, R, W, stride_dy, stride_x, stride_dx,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols[None, :] < W)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(
        dx_ptr + rows[:, None] * stride_dx + cols[None, :],
        (dy * s[:, None]).to(dx_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(ds_ptr + rows, tl.sum(dy * x, axis=1), mask=row_mask)
