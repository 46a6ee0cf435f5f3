"""One-row linear layers for decoding: y = W x, bound by reading W once, with the ops around it fused.

Semantics (`reference`): x [1, K], weight [N, K] (nn.Linear layout), bias [N] or None -> [1, N] in x's dtype,
accumulated in fp32 and rounded once, with optionally
- gated: x [1, 2K] = [gate | up] read as kernels.activation.reference(x) = silu(gate) * up, rounded to the dtype
  as the activation kernel rounds it (the SwiGLU down projection needs no activation kernel);
- a residual add after it: y -> (residual + y * residual_scale) in fp32, rounded once (the o and down projections
  write the new residual stream).
Fusing the RMSNorm before the q/k/v and gate/up projections was tried and lost: every program recomputing the
row's rms cost more (+244 us per Llama-3-8B token on an H100) than the norm kernel it saved (146 us).

Each program owns BLOCK_N rows of W and walks K in BLOCK_K steps, multiply-adding into a fp32 [BLOCK_N, BLOCK_K]
tile summed once at the end. On an H100 (scripts/tune_decode.py --gemv, Llama-3-8B projections, weights not in L2) it reads
2.5-3.2 TB/s where cuBLAS reads 2.0-2.8.
"""

import torch
import triton
import triton.language as tl

from infer.kernels import activation, pdl


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
              residual: torch.Tensor | None = None, residual_scale: float = 1.0) -> torch.Tensor:
    if gated:
        x = activation.reference(x)
    y = x.float() @ weight.float().T  # [T, N]
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if residual is not None:
        y = (residual.float() + y.float() * residual_scale).to(x.dtype)
    return y


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, N, K, residual_scale,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    dtype = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None] * K  # [BLOCK_N, 1]
    # Each step loads the next weight tile before using the current one; the first loads before `enter` (weights
    # are no kernel's output), overlapping the previous kernel's tail.
    w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
    pdl.enter(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + cols < K
        x = tl.load(x_ptr + k0 + cols, mask=k_mask, other=0.0).to(tl.float32)  # [BLOCK_K]
        if GATED:
            up = tl.load(x_ptr + K + k0 + cols, mask=k_mask, other=0.0).to(tl.float32)
            x = activation.silu_times(x, up).to(dtype).to(tl.float32)
        w_next = tl.load(w_rows + (k0 + BLOCK_K + cols)[None, :],
                         mask=row_mask[:, None] & (k0 + BLOCK_K + cols < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        w = w_next
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        r = tl.load(r_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        y = r + y.to(dtype).to(tl.float32) * residual_scale
    tl.store(out_ptr + rows, y.to(dtype), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
         residual: torch.Tensor | None = None, residual_scale: float = 1.0,
         block_n: int = 4, block_k: int = 1024, num_warps: int = 8) -> torch.Tensor:
    """`reference` for x [1, K] (or [1, 2K] gated) with a contiguous last dim; weight [N, K] contiguous;
    residual [1, N] -> new [1, N]."""
    N, K = weight.shape
    assert x.shape == (1, 2 * K if gated else K) and x.stride(1) == 1 and weight.is_contiguous()
    assert residual is None or (residual.shape == (1, N) and residual.is_contiguous())
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)  # [1, N]
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, weight if bias is None else bias, weight if residual is None else residual, out, N, K,
        residual_scale, HAS_BIAS=bias is not None, GATED=gated, RESIDUAL=residual is not None,
        BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(K)), num_warps=num_warps, **pdl.launch(x.device))
    return out
