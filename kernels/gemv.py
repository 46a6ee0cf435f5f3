"""One-row linear layers for decoding: y = W x, bound by reading W once, with the ops around it fused.

Semantics (`reference`): x [1, K], weight [N, K] (nn.Linear layout), bias [N] or None -> [1, N] in x's dtype,
accumulated in fp32 and rounded once, with optionally
- gated: x [1, 2K] = [gate | up] read as kernels.activation.reference(x) = silu(gate) * up, rounded to the dtype
  as the activation kernel rounds it (the SwiGLU down projection needs no activation kernel);
- a residual add after it: y -> (residual + y * residual_scale) in fp32, rounded once (the o and down projections
  write the new residual stream);
- argmax (an argmax_buffer): the row's argmax (lowest index among equal maxima of the rounded y) is also packed
  into it, by atomic maxima spread over ARGMAX_SLOTS addresses (not all programs on one), for greedy decoding
  on the device; `take_argmax` reads it out and empties the buffer.
Fusing the RMSNorm before the q/k/v, gate/up and lm_head projections lost twice on an H100 (Llama-3-8B decode
step): normalising x up front in every program (+244 us per token against the 146 us of norm kernels saved), and
summing x^2 while walking x with the scale applied at the end (5474 against 5460 us per step at depth 0, 6288
against 6233 at 32K, same process; faster in isolation, slower in the step).

Each program owns BLOCK_N rows of W and walks K in BLOCK_K steps, multiply-adding into a fp32 [BLOCK_N, BLOCK_K]
tile summed once at the end. On an H100 (scripts/tune_decode.py --gemv, Llama-3-8B projections, weights not in L2) it reads
2.8-3.2 TB/s where cuBLAS reads 2.0-2.9.
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


_NO_ARGMAX = tl.constexpr(-(1 << 63))  # an argmax slot's value before any row was packed into it
_LOW32 = tl.constexpr((1 << 32) - 1)
ARGMAX_SLOTS = 64


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, best_ptr, N, K, residual_scale,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr, ARGMAX: tl.constexpr,
                 SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
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
    tl.store(out_ptr + rows, y.to(dtype).to(out_ptr.dtype.element_ty), mask=row_mask)
    if ARGMAX:  # pack (value's bits ordered as floats, ~row) so that one int64 max picks the first maximum
        y = tl.where(row_mask, y.to(dtype).to(tl.float32), float("-inf"))
        top = tl.max(y)
        row = tl.min(tl.where(y == top, rows, N))
        bits = top.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        tl.atomic_max(best_ptr + tl.program_id(0) % SLOTS, (ordered << 32) - row.to(tl.int64) + _LOW32)


@triton.jit
def _take_argmax_kernel(best_ptr, token_ptr, advance_ptr, n_advance,
                        SLOTS: tl.constexpr, ADVANCE: tl.constexpr, BLOCK_ADVANCE: tl.constexpr):
    slots = tl.arange(0, SLOTS)
    best = tl.max(tl.load(best_ptr + slots))
    tl.store(token_ptr, -(best & _LOW32) + _LOW32)
    tl.store(best_ptr + slots, tl.full([SLOTS], _NO_ARGMAX, tl.int64))
    if ADVANCE:
        i = tl.arange(0, BLOCK_ADVANCE)
        tl.store(advance_ptr + i, tl.load(advance_ptr + i, mask=i < n_advance) + 1, mask=i < n_advance)


def argmax_buffer(device: torch.device) -> torch.Tensor:
    """An empty argmax buffer for `gemv(..., argmax=)`: int64 [ARGMAX_SLOTS]."""
    return torch.full((ARGMAX_SLOTS,), _NO_ARGMAX.value, dtype=torch.int64, device=device)


def take_argmax(best: torch.Tensor, token: torch.Tensor, advance: torch.Tensor | None = None) -> None:
    """Write the row index packed in the argmax buffer `best` into token (int64 [1]) and empty the buffer; add 1
    to every element of `advance` (contiguous int32: the positions of a decode graph, moved on to the token's)."""
    assert advance is None or (advance.dtype == torch.int32 and advance.is_contiguous())
    n = 0 if advance is None else advance.numel()
    _take_argmax_kernel[(1,)](best, token, best if advance is None else advance, n, SLOTS=ARGMAX_SLOTS,
                              ADVANCE=advance is not None, BLOCK_ADVANCE=triton.next_power_of_2(max(n, 1)))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
         residual: torch.Tensor | None = None, residual_scale: float = 1.0, argmax: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, block_n: int = 4, block_k: int = 1024,
         num_warps: int | None = None) -> torch.Tensor:
    """`reference` for x [1, K] (or [1, 2K] gated) with a contiguous last dim; weight [N, K] contiguous;
    residual [1, N] -> new [1, N]; argmax: an argmax_buffer to pack the output's argmax into; out_dtype: the
    output's dtype (default x's; the values are rounded to x's dtype either way: float32 saves logits a cast).
    Warps default to 4, or 8 when gated (the SiLU of each x tile). H100, Llama-3-8B, weights not in L2
    (scripts/tune_decode.py --gemv): q/k/v 18.4 us, o 11.9, gate/up 76.9, lm_head 331.5 against cuBLAS's 20.8, 16.6,
    81.6, 374.8; the gated down projection took 53 us per layer of a decode step with 4 warps, 42 with 8."""
    N, K = weight.shape
    num_warps = num_warps or (8 if gated else 4)
    assert x.shape == (1, 2 * K if gated else K) and x.stride(1) == 1 and weight.is_contiguous()
    assert residual is None or (residual.shape == (1, N) and residual.is_contiguous())
    assert argmax is None or (argmax.shape == (ARGMAX_SLOTS,) and argmax.dtype == torch.int64)
    out = torch.empty(1, N, dtype=out_dtype or x.dtype, device=x.device)  # [1, N]
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, weight if bias is None else bias, weight if residual is None else residual, out,
        out if argmax is None else argmax, N, K, residual_scale, HAS_BIAS=bias is not None, GATED=gated,
        RESIDUAL=residual is not None, ARGMAX=argmax is not None, SLOTS=ARGMAX_SLOTS, BLOCK_N=block_n,
        BLOCK_K=min(block_k, triton.next_power_of_2(K)), num_warps=num_warps, **pdl.launch(x.device))
    return out
