"""Every Triton kernel of upcycle compiles for an H100 (sm_90) on a machine without a GPU.

Triton compiles ahead of time through its own ptxas, so the GPU-only code (which the CPU tests
otherwise reach only through Triton's interpreter) is checked here for what the interpreter
cannot see: that it lowers at all, and, for the grouped GEMMs, that their operand loads are
pipelined (cp.async into shared memory) into Hopper's tensor-core instructions (wgmma) within
the shared memory an H100 has, without spilling registers. Arguments are specialised as a launch specialises them: pointers
and integers divisible by 16, unit strides as constants.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

H100_SHARED_BYTES = 227 * 1024  # the most one block may use on an H100


def spills(kernel) -> int:
    """Bytes of local memory per thread (register spills), read from the cubin by Triton's cuobjdump."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as handle:
            handle.write(kernel.asm["cubin"])
        report = subprocess.run(
            [tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
    return int(re.search(r"LOCAL:(\d+)", report).group(1))


def compile_sm90(fn, types: dict[str, str], constants: dict[str, object], warps: int = 4, stages: int = 3):
    """Compile `fn` for sm_90: `types` the run-time arguments (Triton type strings, in order),
    `constants` every constexpr (unit strides included)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [name for name in fn.arg_names]
    signature = {name: types.get(name, "constexpr") for name in names}
    missing = [name for name in names if name not in types and name not in constants]
    assert not missing, f"no type or constant for {missing}"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name in types}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )


def test_element_wise_kernels_compile_for_sm90() -> None:
    from upcycle.kernels import triton_kernels as tk

    bf16, i32 = "*bf16", "i32"
    compile_sm90(
        tk.swiglu_forward_kernel,
        {"h_ptr": bf16, "a_ptr": bf16, "F": i32, "stride_h": i32, "stride_a": i32},
        {"BLOCK": 1024},
    )
    compile_sm90(
        tk.swiglu_backward_kernel,
        {"h_ptr": bf16, "d_ptr": bf16, "w_ptr": bf16, "dh_ptr": bf16, "dw_ptr": "*fp32", "aw_ptr": bf16, "F": i32,
         "stride_h": i32, "stride_d": i32, "stride_dh": i32, "stride_aw": i32},
        {"BLOCK": 1024, "NUM_BLOCKS": 14},
    )  # fmt: skip
    for weighted in (True, False):
        compile_sm90(
            tk.gather_sum_kernel,
            {"src_ptr": bf16, "index_ptr": "*i64", "w_ptr": bf16, "out_ptr": bf16, "D": i32, "stride_src": i32, "stride_out": i32},
            {"K": 8, "HAS_WEIGHTS": weighted, "BLOCK": 1024},
        )  # fmt: skip
    compile_sm90(
        tk.scale_rows_backward_kernel,
        {"dy_ptr": bf16, "x_ptr": bf16, "s_ptr": bf16, "dx_ptr": bf16, "ds_ptr": "*fp32", "R": i32, "W": i32,
         "stride_dy": i32, "stride_x": i32, "stride_dx": i32},
        {"ROWS": 16, "BLOCK": 64},
    )  # fmt: skip


@pytest.mark.parametrize("experts", [8, 16])
def test_router_kernels_compile_for_sm90_without_spills(experts: int) -> None:
    """The fp32 router's kernels (`upcycle.kernels.router_gemm`) with its launch shapes, at
    Mixtral's 8 experts and the widest, 16, over rows of 1024 features or more (the largest
    tiles): IEEE fp32 multiply-adds (no TF32 tensor-core instructions), no register spills."""
    from upcycle.kernels import router_gemm as rg
    from upcycle.kernels import triton_kernels as tk

    i32 = "i32"
    block_e = rg._block_e(experts)
    sizes = {"T": i32, "D": i32, "E": i32}
    (dw_t, dw_d), (logits_t, logits_d) = rg.dw_blocks(4096), rg.logits_blocks(4096)
    dw = {"g_ptr": "*fp32", "x_ptr": "*bf16", "part_ptr": "*fp32", **sizes, "stride_x": i32}
    dw_blocks = {"BLOCK_T": dw_t, "BLOCK_E": block_e, "BLOCK_D": dw_d, "CHUNK": rg._CHUNK}
    compiled = [compile_sm90(tk.router_dw_kernel, dw, dw_blocks, rg._DW_WARPS)]
    for w in ("*fp32", "*bf16"):  # an fp32 router, or a bf16 checkpoint's
        logits = {"x_ptr": "*bf16", "w_ptr": w, "out_ptr": "*fp32", **sizes, "stride_x": i32}
        dx = {"g_ptr": "*fp32", "w_ptr": w, "dx_ptr": "*bf16", **sizes, "stride_dx": i32}
        logits_blocks = {"BLOCK_T": logits_t, "BLOCK_E": block_e, "BLOCK_D": logits_d}
        dx_blocks = {"BLOCK_T": rg._DX_BLOCK_T, "BLOCK_E": block_e, "BLOCK_D": rg._DX_BLOCK_D}
        compiled.append(compile_sm90(tk.router_logits_kernel, logits, logits_blocks, rg._LOGITS_WARPS))
        compiled.append(compile_sm90(tk.router_dx_kernel, dx, dx_blocks, rg._DX_WARPS))
    for kernel in compiled:
        assert "tf32" not in kernel.asm["ptx"] and spills(kernel) == 0, kernel.name


def compile_pipelined_gemm(fn, types: dict[str, str], constants: dict[str, object]):
    """Compile a gathered GEMM with gather_gemm's launch options; check that its operand loads
    are pipelined (cp.async) into wgmma, within an H100's shared memory, without spills."""
    from upcycle.kernels import gather_gemm

    kernel = compile_sm90(fn, types, constants, gather_gemm.NUM_WARPS, gather_gemm.NUM_STAGES)
    ptx = kernel.asm["ptx"]
    assert "wgmma" in ptx and "cp.async" in ptx
    assert kernel.metadata.shared <= H100_SHARED_BYTES
    assert spills(kernel) == 0
    return kernel


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_gathered_grouped_mm_compiles_to_pipelined_wgmma(layout: str) -> None:
    from upcycle.kernels import gather_gemm
    from upcycle.kernels import triton_kernels as tk

    BM, BN, BK = gather_gemm.MM_TILES
    unit = "stride_wk" if layout == "nk" else "stride_wn"  # the weight's contiguous dimension
    types = {
        name: "i32" for name in ("N", "K", "stride_src", "stride_we", "stride_wk", "stride_wn", "stride_out")
    }
    types.update(src_ptr="*bf16", rows_ptr="*i64", w_ptr="*bf16", out_ptr="*bf16", offsets_ptr="*i32")
    del types[unit]
    constants = {
        unit: 1,
        "E": 64,
        "E_POW2": 64,
        "GATHER": True,
        "PRECISION": "tf32",
        "BM": BM,
        "BN": BN,
        "BK": BK,
    }
    kernel = compile_pipelined_gemm(tk.gather_grouped_mm_kernel, types, constants)
    stage_bytes = (BM * BK + BK * BN) * 2
    assert gather_gemm.NUM_STAGES * stage_bytes <= kernel.metadata.shared
    # the expert's offset into the stacked weights is an int64 product (E experts > 2^31 elements)
    ttir = [line.strip() for line in kernel.asm["ttir"].splitlines()]
    products = [line for line in ttir if line.startswith("%w_base") and "arith.muli" in line]
    assert products and all(": i64" in line for line in products), products


@pytest.mark.parametrize("gathered", ["g", "s"])
def test_gathered_grouped_wgrad_compiles_to_pipelined_wgmma(gathered: str) -> None:
    from upcycle.kernels import gather_gemm
    from upcycle.kernels import triton_kernels as tk

    BN, BK, BR = gather_gemm.WGRAD_TILES
    types = {name: "i32" for name in ("N", "K", "stride_g", "stride_s", "stride_oe", "stride_on")}
    types.update(
        g_ptr="*bf16",
        g_rows_ptr="*i64",
        s_ptr="*bf16",
        s_rows_ptr="*i64",
        out_ptr="*bf16",
        offsets_ptr="*i32",
    )
    constants = {
        "G_GATHER": gathered == "g",
        "S_GATHER": gathered == "s",
        "PRECISION": "tf32",
        "BN": BN,
        "BK": BK,
        "BR": BR,
    }
    compile_pipelined_gemm(tk.gather_grouped_wgrad_kernel, types, constants)
