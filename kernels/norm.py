"""RMSNorm of rows: one launch, one program per row.

Semantics (`reference`): x [T, hidden], weight [hidden] of x's dtype.
  rms_norm(x, w, eps) = w * (xf * rsqrt(mean(xf^2) + eps)).to(dtype), xf = x.float(): the normalised row is
  rounded to the dtype, then multiplied by the weight and rounded again, as Hugging Face's RMSNorm does.
"""

import torch
import triton
import triton.language as tl

from infer.kernels import pdl


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden] -> [..., hidden]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, eps, N: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, hidden] (rows may be strided, last dim contiguous), weight [hidden] -> new contiguous [T, hidden]."""
    T, N = x.shape
    assert x.stride(1) == 1 and weight.shape == (N,) and weight.is_contiguous() and weight.dtype == x.dtype
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)  # [T, hidden]
    BLOCK = triton.next_power_of_2(N)
    _rms_norm_kernel[(T,)](x, weight, out, x.stride(0), eps, N=N, BLOCK=BLOCK,
                           num_warps=min(max(BLOCK // 512, 1), 16), **pdl.launch(x.device))
    return out
