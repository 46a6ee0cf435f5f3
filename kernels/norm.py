"""RMSNorm of rows, optionally fused with the residual add before it: one launch, one program per row.

Semantics (`reference`): x [T, hidden], weight [hidden] of x's dtype.
  rms_norm(x, w, eps) = w * (xf * rsqrt(mean(xf^2) + eps)).to(dtype), xf = x.float(): the normalised row is
  rounded to the dtype, then multiplied by the weight and rounded again, as engine/model.py RMSNorm does.
  rms_norm(x, w, eps, residual, s) = (rms_norm(h, w, eps), h) with h = (residual + x * s) computed in fp32 and
  rounded once to the dtype (the kernel may fuse the multiply-add: it can differ from the reference by an fp32
  rounding, rarely an ulp of the dtype). The model's `residual + x * s` in the dtype rounds after the multiply and
  after the add; with s == 1 the multiply is exact and both give the same h, otherwise h may differ by an ulp.
"""

import torch
import triton
import triton.language as tl


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
              residual_scale: float = 1.0):
    """x [..., hidden] -> [..., hidden]; with residual [..., hidden]: (normed, h) with h the new residual stream."""
    if residual is not None:
        h = (residual.float() + x.float() * residual_scale).to(x.dtype)  # [..., hidden]
        return reference(h, weight, eps), h
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, r_ptr, out_ptr, h_ptr,
    stride_x, stride_r, eps, residual_scale,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        h = (r + x * residual_scale).to(dtype)
        tl.store(h_ptr + row * N + offs, h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = ((x * rstd).to(dtype).to(tl.float32) * w).to(dtype)
    tl.store(out_ptr + row * N + offs, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             residual_scale: float = 1.0):
    """x [T, hidden] (rows may be strided, last dim contiguous), weight [hidden] -> [T, hidden]; with residual
    [T, hidden]: (normed, h), both new contiguous [T, hidden]. See the module docstring."""
    T, N = x.shape
    assert x.stride(1) == 1 and weight.shape == (N,) and weight.is_contiguous() and weight.dtype == x.dtype
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)  # [T, hidden]
    h = None
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype
        h = torch.empty_like(out)  # [T, hidden]
    BLOCK = triton.next_power_of_2(N)
    _rms_norm_kernel[(T,)](
        x, weight, residual, out, h,
        x.stride(0), residual.stride(0) if residual is not None else 0, eps, residual_scale,
        N=N, BLOCK=BLOCK, HAS_RESIDUAL=residual is not None, num_warps=min(max(BLOCK // 512, 1), 16),
    )
    return out if residual is None else (out, h)
