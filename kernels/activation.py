"""SwiGLU activation on the output of a fused gate/up projection: silu(gate) * up, one launch.

Semantics (`reference`): gate_up [T, 2*I] holds gate in columns [0, I) and up in [I, 2*I); the result
silu(gate) * up [T, I] is computed in fp32 and rounded once to the dtype (F.silu(gate) * up in bf16/fp16, as
Hugging Face computes it, rounds silu(gate) first: the two may differ by an ulp). `silu_times` is the fp32 math,
shared with the gated GEMV (kernels.gemv).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2*I] -> [..., I]."""
    gate, up = gate_up.float().chunk(2, dim=-1)  # [..., I] each
    return (F.silu(gate) * up).to(gate_up.dtype)


@triton.jit
def silu_times(gate, up):
    """silu(gate) * up of fp32 tensors, in fp32."""
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, I: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(gu_ptr + t * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    up = tl.load(gu_ptr + t * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    tl.store(out_ptr + t * I + offs, silu_times(gate, up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2*I] (rows may be strided, last dim contiguous) -> new contiguous [T, I]."""
    T, two_i = gate_up.shape
    assert two_i % 2 == 0 and gate_up.stride(1) == 1
    I = two_i // 2
    out = torch.empty(T, I, dtype=gate_up.dtype, device=gate_up.device)  # [T, I]
    BLOCK = min(1024, triton.next_power_of_2(I))
    _silu_mul_kernel[(T, triton.cdiv(I, BLOCK))](gate_up, out, gate_up.stride(0), I=I, BLOCK=BLOCK, num_warps=4)
    return out
