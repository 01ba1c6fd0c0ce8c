"""The Triton kernels behind `upcycle.kernels.swiglu`, `combine`, `gather_gemm` and `adamw`.

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


@triton.jit
def _expert_of_tile(offsets_ptr, tile, E: tl.constexpr, E_POW2: tl.constexpr, BM: tl.constexpr):
    """(expert, first row, end row) of row tile `tile` when each expert's rows [start, end) of the
    expert-sorted order are cut into tiles of BM; expert = -1 beyond the last tile."""
    experts = tl.arange(0, E_POW2)
    valid = experts < E
    ends = tl.load(offsets_ptr + experts, mask=valid, other=0).to(tl.int64)
    ends = tl.where(valid, ends, tl.max(ends, axis=0))
    starts = tl.load(offsets_ptr + experts - 1, mask=valid & (experts > 0), other=0).to(tl.int64)
    tiles = tl.where(valid, (ends - starts + BM - 1) // BM, 0)
    cumulative = tl.cumsum(tiles, 0)
    expert = tl.sum((cumulative <= tile).to(tl.int32), axis=0)
    mine = experts == expert
    first_tile = tl.sum(tl.where(mine, cumulative - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(mine, starts, 0), axis=0) + (tile - first_tile) * BM
    row_end = tl.sum(tl.where(mine, ends, 0), axis=0)
    expert = tl.where(tile < tl.sum(tiles, axis=0), expert, -1)
    return expert, row_start, row_end


@triton.jit
def gather_grouped_mm_kernel(
    src_ptr, rows_ptr, w_ptr, out_ptr, offsets_ptr, N, K,
    stride_src, stride_we, stride_wk, stride_wn, stride_out,
    E: tl.constexpr, E_POW2: tl.constexpr, GATHER: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """out[a] = src[rows[a]] @ W[e(a)] for expert-sorted rows a (rows[a] = a without GATHER);
    W[e] is read as [K, N] through its strides (a transposed weight costs nothing)."""
    expert, row_start, row_end = _expert_of_tile(offsets_ptr, tl.program_id(0).to(tl.int64), E, E_POW2, BM)
    if expert >= 0:
        rm = row_start + tl.arange(0, BM)
        mask_m = rm < row_end
        src_rows = tl.load(rows_ptr + rm, mask=mask_m, other=0).to(tl.int64) if GATHER else rm
        rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
        mask_n = rn < N
        # int64: E stacked experts may exceed 2^31 elements (one expert's [K, N] slice does not)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mask_k = rk < K
            a = tl.load(
                src_ptr + src_rows[:, None] * stride_src + rk[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                w_base + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        out = out_ptr + rm[:, None] * stride_out + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def gather_grouped_wgrad_kernel(
    g_ptr, g_rows_ptr, s_ptr, s_rows_ptr, out_ptr, offsets_ptr, N, K,
    stride_g, stride_s, stride_oe, stride_on,
    G_GATHER: tl.constexpr, S_GATHER: tl.constexpr, PRECISION: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """out[e] = Σ over expert e's sorted rows a of g[gr(a)]^T s[sr(a)] ([N, K]; zeros for an expert
    without rows), gr / sr the row indices where G_GATHER / S_GATHER, else a itself."""
    expert = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + expert).to(tl.int64)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.program_id(2).to(tl.int64) * BK + tl.arange(0, BK)
    mask_n, mask_k = rn < N, rk < K
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for r0 in range(start, end, BR):
        rr = r0 + tl.arange(0, BR)
        mask_r = rr < end
        g_rows = tl.load(g_rows_ptr + rr, mask=mask_r, other=0).to(tl.int64) if G_GATHER else rr
        s_rows = tl.load(s_rows_ptr + rr, mask=mask_r, other=0).to(tl.int64) if S_GATHER else rr
        g_t = tl.load(
            g_ptr + g_rows[None, :] * stride_g + rn[:, None],
            mask=mask_r[None, :] & mask_n[:, None],
            other=0.0,
        )
        s = tl.load(
            s_ptr + s_rows[:, None] * stride_s + rk[None, :],
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        )
        acc = tl.dot(g_t, s, acc, input_precision=PRECISION)
    out = out_ptr + expert * stride_oe + rn[:, None] * stride_on + rk[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, factors_ptr, scale_ptr, inf_ptr, N,
    beta1, beta2, eps, weight_decay,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, HAS_DECAY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if HAS_INF:  # found_inf = 1 (torch's rule): nothing is read or written (masked loads touch no memory)
        N = tl.where(tl.load(inf_ptr) == 1.0, 0, N)
    mask = offsets < N
    step_size = tl.load(factors_ptr)  # lr / (1 − β1^step)
    bias_correction2_sqrt = tl.load(factors_ptr + 1)  # √(1 − β2^step)
    lr = tl.load(factors_ptr + 2)  # the learning rate in fp32
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(scale_ptr).to(tl.float32))
    if HAS_DECAY:  # as torch, no decay term at all when it is 0 (an inf weight stays inf, not NaN)
        p = p - lr * weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    # IEEE square root and divisions, as torch's kernel (Triton's defaults are approximations)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy_kernel(
    logits_ptr, labels_ptr, count_ptr, losses_ptr, V, stride, ignore_index,
    BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    if NUM_BLOCKS == 1:  # the whole row in registers: one read, one write, one exp an element
        cols = tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        top = tl.max(x, 0)
        picked = tl.sum(tl.where(cols == label, x, 0.0), 0)
        e = tl.exp(x - top)  # kept for the gradient: softmax = e / Σ e
        total = tl.sum(e, 0)
        lse = top + tl.log(total)
    else:
        # pass 1: each lane's running maximum and sum of exponentials (online softmax)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        hit = tl.zeros([BLOCK], dtype=tl.float32)
        for block in range(NUM_BLOCKS):
            cols = block * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            hit += tl.where(cols == label, x, 0.0)
            top = tl.maximum(m, x)
            empty = top == float("-inf")  # masked lanes so far: no exp(-inf - -inf)
            s = tl.where(empty, 0.0, s * tl.exp(m - top) + tl.exp(x - top))
            m = top
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - top)), 0))
        picked = tl.sum(hit, 0)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < V)
    # the label's logit from the values already read, not loaded again: the row is overwritten
    # below by other warps, with no barrier in between. A label outside the vocabulary gives a
    # NaN loss (the step's non-finite check stops it)
    picked = tl.where(in_range, picked, float("nan"))
    tl.store(losses_ptr + row, tl.where(ignored, 0.0, lse - picked))
    # pass 2: the gradient of the mean loss, (softmax − one-hot) / count, over the logits: per
    # element a multiply by reciprocals (within fp32's last places of the divisions; the bf16
    # store rounds far coarser). With a second exponential and an IEEE division per element the
    # pass took 1.36 ms on an H100 where it now takes 0.93 (bench/RESULTS.md ninth round)
    inv_count = tl.where(ignored, 0.0, tl.div_rn(1.0, tl.load(count_ptr).to(tl.float32)))
    if NUM_BLOCKS == 1:
        cols = tl.arange(0, BLOCK)
        g = e * (tl.div_rn(1.0, total) * inv_count) - tl.where(cols == label, inv_count, 0.0)
        g = tl.where(ignored, 0.0, g)  # zero even where the row holds a NaN or an inf
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)
    else:
        for block in range(NUM_BLOCKS):
            cols = block * BLOCK + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * inv_count - tl.where(cols == label, inv_count, 0.0)
            g = tl.where(ignored, 0.0, g)
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    # x *= s in place: x times the fp32 s, in fp32, rounded once to x's dtype (cross_entropy.scale_)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    s = tl.load(scale_ptr).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + offsets, (x * s).to(x_ptr.dtype.element_ty), mask=mask)


# The fp32 router (`upcycle.kernels.router_gemm`): IEEE fp32 multiply-adds on the CUDA cores,
# bf16 or fp32 operands read as they are and upcast in registers. No tl.dot: its fp32 path pads
# the experts to 16 and stages both operands through shared memory, and at the launch shapes it
# needed (64 tokens a program) too few programs were in flight to hide the loads (run ZB: 0.10 ms
# for the Mixtral step's logits, where reading x takes 0.01). Products accumulate element-wise
# in an [experts × tokens × features] block and are summed once at the end, in a fixed order.
@triton.jit
def _tile_f32(ptr, rows, cols, stride_row, stride_col, R, C):
    # the tile ptr[r · stride_row + c · stride_col] for r in rows, c in cols, as fp32; 0 outside R × C
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0).to(
        tl.float32
    )


@triton.jit
def router_logits_kernel(
    x_ptr, w_ptr, out_ptr, T, D, E, stride_x,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # out[t, e] = Σ_d x[t, d] · w[e, d], fp32. A [BLOCK_T, BLOCK_D] tile of x is loaded at once
    # (most of a row or all of it: many bytes in flight) and reused for every expert, whose
    # products are summed over the tile at once; the experts' loop is unrolled
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = _tile_f32(x_ptr, rows, cols, stride_x, 1, T, D)
        for e in tl.static_range(BLOCK_E):
            w = tl.load(w_ptr + e * D + cols, mask=cols < tl.where(e < E, D, 0), other=0.0).to(tl.float32)
            dot = tl.sum(x * w[None, :], axis=1)
            acc = tl.where(experts[None, :] == e, acc + dot[:, None], acc)
    tl.store(
        out_ptr + rows[:, None] * E + experts[None, :], acc, mask=(rows[:, None] < T) & (experts[None, :] < E)
    )


@triton.jit
def router_dx_kernel(
    g_ptr, w_ptr, dx_ptr, T, D, E, stride_dx,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # dx[t, d] = Σ_e g[t, e] · w[e, d] in fp32, experts in order, rounded once to dx's dtype; the
    # experts' loop is unrolled so that all its loads are in flight together (padding adds 0)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for e in tl.static_range(BLOCK_E):
        g = tl.load(g_ptr + rows * E + e, mask=rows < tl.where(e < E, T, 0), other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e * D + cols, mask=cols < tl.where(e < E, D, 0), other=0.0).to(tl.float32)
        acc += g[:, None] * w[None, :]
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def router_dw_kernel(
    g_ptr, x_ptr, part_ptr, T, D, E, stride_x,
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # part[c, e, d] = Σ_{t in chunk c} g[t, e] · x[t, d], fp32: [BLOCK_T, BLOCK_D] tiles of x,
    # each reused for every expert (unrolled), the products summed over the tile's tokens at once
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(1)
    experts = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, CHUNK, BLOCK_T):
        rows = chunk.to(tl.int64) * CHUNK + t0 + tl.arange(0, BLOCK_T)
        x = _tile_f32(x_ptr, rows, cols, stride_x, 1, T, D)
        for e in tl.static_range(BLOCK_E):
            g = tl.load(g_ptr + rows * E + e, mask=rows < tl.where(e < E, T, 0), other=0.0).to(tl.float32)
            dot = tl.sum(g[:, None] * x, axis=0)
            acc = tl.where(experts[:, None] == e, acc + dot[None, :], acc)
    out = part_ptr + chunk.to(tl.int64) * E * D + experts[:, None] * D + cols[None, :]
    tl.store(out, acc, mask=(experts[:, None] < E) & (cols[None, :] < D))


@triton.jit
def sum_squares_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # one program: ITERS blocks of BLOCK consecutive elements, each lane's squares summed in fp32,
    # then the lanes summed; the partial is stored in fp64 for the caller's fp64 total
    start = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(ITERS):
        offsets = start + i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets < N, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0).to(tl.float64))
