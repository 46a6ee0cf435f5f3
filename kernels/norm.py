"""RMSNorm of rows: one launch, one program per row.

Semantics (`reference`): x [T, hidden], weight [hidden] of x's dtype.
  rms_norm(x, w, eps) = w * (xf * rsqrt(mean(xf^2) + eps)).to(dtype), xf = x.float(): the normalised row is
  rounded to the dtype, then multiplied by the weight and rounded again, as Hugging Face's RMSNorm does.
For a decode step's integer-dot GEMVs the same launch can also round the row to 8 bits per 32 (quant.round_x's
values of the output), instead of a launch of round_x after it.
"""

import torch
import triton
import triton.language as tl

from infer.kernels import pdl, quant


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden] -> [..., hidden]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, q_ptr, d_ptr, sums_ptr, stride_x, eps, N: tl.constexpr,
                     BLOCK: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dtype = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # no kernel writes it: loads before the wait
    pdl.enter(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    rstd = tl.rsqrt(tl.sum(x * x) / N + eps)
    y = ((x * rstd).to(dtype).to(tl.float32) * w).to(dtype)
    tl.store(out_ptr + row * N + offs, y, mask=mask)
    if ROUND:  # one row: round_x's values of y, its groups of 32 in halves of 16 (past N: zeros, not stored)
        q, d, sums = quant.round_groups(tl.reshape(y.to(tl.float32), [BLOCK // 32, 2, 16]))
        group = tl.arange(0, BLOCK // 32)[:, None, None]  # [BLOCK / 32, 1, 1]
        half = tl.arange(0, 2)[None, :, None]  # [1, 2, 1]
        k = group * 32 + half * 16 + tl.arange(0, 16)[None, None, :]  # [BLOCK / 32, 2, 16]
        tl.store(q_ptr + k, q.to(tl.int8), mask=k < N)
        tl.store(d_ptr + group, d, mask=group * 32 < N)
        tl.store(sums_ptr + group * 2 + half, sums, mask=group * 32 < N)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, round_x: bool = False):
    """x [T, hidden] (rows may be strided, last dim contiguous), weight [hidden] -> new contiguous [T, hidden];
    with round_x (T = 1, hidden a multiple of 32), (that, quant.round_x of it)."""
    T, N = x.shape
    assert x.stride(1) == 1 and weight.shape == (N,) and weight.is_contiguous() and weight.dtype == x.dtype
    assert not round_x or (T == 1 and N % 32 == 0)
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)  # [T, hidden]
    rounded = quant.empty_rounded(N, x.device) if round_x else (out, out, out)
    BLOCK = triton.next_power_of_2(N)
    _rms_norm_kernel[(T,)](x, weight, out, *rounded, x.stride(0), eps, N=N, BLOCK=BLOCK, ROUND=round_x,
                           num_warps=min(max(BLOCK // 512, 1), 16), **pdl.launch(x.device))
    return (out, rounded) if round_x else out
