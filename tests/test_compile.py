"""The packed-weight kernels (the integer dot products' inline assembly too) compile for an H200 (sm_90), checked on
the CPU. The interpreter that runs the other kernel tests accepts what a compiled kernel rejects (a loop variable
whose shape changes, say), so this compiles them, in a process without TRITON_INTERPRET (under it @triton.jit gives
interpreted functions, which do not compile)."""

import os
import subprocess
import sys

from test_quant import BLOCK_TYPES

COMPILE = """
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from infer.kernels import gemv, quant

def compile_for_sm90(kernel, arguments, constants):
    signature = {**arguments, **{name: "constexpr" for name in constants}}
    constexprs = {(list(signature).index(name),): value for name, value in constants.items()}
    triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

POINTERS = {"x_ptr": "*bf16", "w_ptr": "*u8", "b_ptr": "*bf16", "r_ptr": "*bf16", "out_ptr": "*bf16"}
for name in sys.argv[1:]:
    qt = quant.quant_type(name)
    for nb in (1, 4):  # one block a step, and groups
        for gated in (False, True):
            compile_for_sm90(gemv._packed_gemv_kernel,
                             {**POINTERS, "best_ptr": "*i64", "N": "i32", "K": "i32", "row_bytes": "i32",
                              "residual_scale": "fp32"},
                             dict(QTYPE=name, BLOCK_ELEMS=qt.block_elems, HAS_BIAS=True, GATED=gated, RESIDUAL=True,
                                  ARGMAX=True, SLOTS=gemv.ARGMAX_SLOTS, BLOCK_N=4, NB=nb, PDL=True))
        compile_for_sm90(gemv._skinny_gemm_kernel,
                         {**POINTERS, "T": "i32", "N": "i32", "K": "i32", "row_bytes": "i32", "stride_x": "i32",
                          "residual_scale": "fp32"},
                         dict(QTYPE=name, BLOCK_ELEMS=qt.block_elems, HAS_BIAS=True, RESIDUAL=True,
                              BLOCK_T=gemv.SKINNY_MAX_ROWS, BLOCK_N=16, NB=nb, PDL=True))
        if name in quant.DOT_TYPES:
            compile_for_sm90(gemv._dot_gemv_kernel,
                             {"xq_ptr": "*i32", "xd_ptr": "*fp32", "xs_ptr": "*fp32", "w_ptr": "*u8", "b_ptr": "*bf16",
                              "r_ptr": "*bf16", "out_ptr": "*bf16", "best_ptr": "*i64", "N": "i32", "K": "i32",
                              "row_bytes": "i32", "residual_scale": "fp32"},
                             dict(DTYPE=gemv._TRITON_DTYPES[torch.bfloat16], QTYPE=name, BLOCK_ELEMS=qt.block_elems,
                                  HAS_BIAS=True, RESIDUAL=True, ARGMAX=True, SLOTS=gemv.ARGMAX_SLOTS, BLOCK_N=4,
                                  NB=nb, HARDWARE=True, PDL=True))
        compile_for_sm90(quant._dequantize_kernel,
                         {"w_ptr": "*u8", "rows_ptr": "*i64", "out_ptr": "*bf16", "N": "i32", "row_bytes": "i32",
                          "K": "i32"},
                         dict(QTYPE=name, BLOCK_ELEMS=qt.block_elems, GATHER=True, BLOCK_N=4, NB=nb))
for gated in (False, True):
    compile_for_sm90(quant._round_x_kernel, {"x_ptr": "*bf16", "q_ptr": "*i8", "d_ptr": "*fp32", "sums_ptr": "*fp32",
                                             "K": "i32"}, dict(GATED=gated, GROUPS=8, PDL=True))
"""


def test_packed_kernels_compile_for_an_h200():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE, *BLOCK_TYPES], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
