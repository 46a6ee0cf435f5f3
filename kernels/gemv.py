"""Linear layers of one row (decoding) and of a few rows over packed weights, bound by reading the weight once, with
the ops around them fused.

Semantics (`reference`): x [T, K], weight [N, K] (nn.Linear layout), bias [N] or None -> [T, N] in x's dtype,
accumulated in fp32 and rounded once, with optionally
- a packed weight: uint8 [N, row_bytes] of a GGUF type `qtype` (kernels.quant), multiplied as the fp32 values
  quant.reference gives;
- gated: x [T, 2K] = [gate | up] read as kernels.activation.reference(x) = silu(gate) * up, rounded to the dtype
  as the activation kernel rounds it (the SwiGLU down projection needs no activation kernel);
- a residual add after it: y -> (residual + y * residual_scale) in fp32, rounded once (the o and down projections
  write the new residual stream);
- argmax (an argmax_buffer; one row): the row's argmax (lowest index among equal maxima of the rounded y) is also
  packed into it, by atomic maxima spread over ARGMAX_SLOTS addresses (not all programs on one), for greedy
  decoding on the device; `take_argmax` reads it out and empties the buffer.
The RMSNorm before the q/k/v, gate/up and lm_head projections stays a kernel of its own: fused here it made the
decode step slower (BENCHMARKS.md). For the integer dot (below) it also writes its output rounded (`rounded`).

`gemv` (T = 1): each program owns BLOCK_N rows of W. A dense W is walked in BLOCK_K steps multiply-adding into a
fp32 [BLOCK_N, BLOCK_K] tile summed once at the end; a packed W in groups of NB blocks decoded in registers by
quant.decode, each of its two halves multiplied by x read at its columns and added up in the shape it was decoded
in. Except where `integer_dot` (Q4_K, Q5_K, Q6_K and Q8_0 rows of aligned words): there x is rounded to 8 bits per 32
elements first (quant.round_x) and the groups meet it in integer dot products (quant.dot), as llama.cpp's GPU decode
does (the decode step 2.1x faster for Q4_K_M, 2.3x for Q8_0 on an H200, BENCHMARKS.md); the result is then
`reference` of x_hat = quant.round_x_reference(x), not of x. `skinny_gemm` (T = 2..16, packed W): each decoded
half serves all T rows through tl.dot.
"""

import torch
import triton
import triton.language as tl

from infer.kernels import activation, pdl, quant

_REFERENCE_CHUNK = 1 << 24  # weight elements dequantized at a time by `reference` (64 MB of fp32)
SKINNY_MAX_ROWS = 16  # the most rows skinny_gemm takes: one tensor-core tile of rows


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
              residual: torch.Tensor | None = None, residual_scale: float = 1.0, qtype=None) -> torch.Tensor:
    """x [T, K] (or [T, 2K] gated), weight [N, K] or, with qtype (a quant type code, name or QuantType), uint8
    [N, row_bytes] in quant's kernel layout -> [T, N]. A packed weight is dequantized a chunk of rows at a time, so
    that a large layer never exists in fp32 as a whole."""
    if gated:
        x = activation.reference(x)
    if qtype is None:
        y = x.float() @ weight.float().T  # [T, N]
    else:
        chunk = max(1, _REFERENCE_CHUNK // quant.quant_type(qtype).row_elems(weight.shape[1]))
        y = torch.cat([x.float() @ quant.reference(quant.from_kernel_layout(w, qtype), qtype).T
                       for w in weight.split(chunk)], dim=1)  # [T, N]
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if residual is not None:
        y = (residual.float() + y.float() * residual_scale).to(x.dtype)
    return y


_NO_ARGMAX = tl.constexpr(-(1 << 63))  # an argmax slot's value before any row was packed into it
EMPTY_ARGMAX = _NO_ARGMAX.value
_LOW32 = tl.constexpr((1 << 32) - 1)
ARGMAX_SLOTS = 64


@triton.jit
def _x_at(x_ptr, K, k, mask, GATED: tl.constexpr):
    """x's elements at columns k (fp32; 0 where mask is false, None: all in bounds); gated: silu(gate) * up of
    x = [gate | up], rounded to x's dtype as the activation kernel writes it. (A mask the compiler cannot prove
    constant keeps the loads from being vectorized.)"""
    if mask is None:
        x = tl.load(x_ptr + k).to(tl.float32)
        if GATED:
            up = tl.load(x_ptr + K + k).to(tl.float32)
            x = activation.silu_times(x, up).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        x = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(x_ptr + K + k, mask=mask, other=0.0).to(tl.float32)
            x = activation.silu_times(x, up).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _epilogue(y, n, at, mask, b_ptr, r_ptr, out_ptr, residual_scale, dtype: tl.constexpr,
              HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr):
    """Add the bias (at output columns n) and the residual (at offsets `at`, as out) to the fp32 sums y, store them
    at out_ptr + at; returns the stored values rounded to dtype, in fp32."""
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        r = tl.load(r_ptr + at, mask=mask, other=0.0).to(tl.float32)
        y = r + y.to(dtype).to(tl.float32) * residual_scale
    y = y.to(dtype)
    tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=mask)
    return y.to(tl.float32)


@triton.jit
def _pack_argmax(y, rows, row_mask, N, best_ptr, SLOTS: tl.constexpr):
    """Pack (y's largest value's bits ordered as floats, ~its lowest row) so that one int64 max picks the first
    maximum across programs."""
    y = tl.where(row_mask, y, float("-inf"))
    top = tl.max(y)
    row = tl.min(tl.where(y == top, rows, N))
    bits = top.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    tl.atomic_max(best_ptr + tl.program_id(0) % SLOTS, (ordered << 32) - row.to(tl.int64) + _LOW32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, best_ptr, N, K, residual_scale,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr, ARGMAX: tl.constexpr,
                 SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # Its x read, epilogue and argmax are those of _x_at, _epilogue and _pack_argmax spelled out: built from those
    # helpers the kernel was 1% slower in the decode step on an H200 (BENCHMARKS.md).
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
def _row_sums(acc):
    """[BLOCK_N, ...] -> [BLOCK_N]: each row's sum."""
    return tl.sum(tl.reshape(acc, [acc.shape[0], acc.numel // acc.shape[0]]), axis=1)


@triton.jit
def _packed_gemv_kernel(x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, best_ptr, N, K, row_bytes, residual_scale,
                        QTYPE: tl.constexpr, BLOCK_ELEMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                        GATED: tl.constexpr, RESIDUAL: tl.constexpr, ARGMAX: tl.constexpr, SLOTS: tl.constexpr,
                        BLOCK_N: tl.constexpr, NB: tl.constexpr, PDL: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < N
    row_off = rows.to(tl.int64) * row_bytes  # [BLOCK_N]
    n_blocks = K // BLOCK_ELEMS
    n_groups = n_blocks // NB
    GROUP: tl.constexpr = NB * BLOCK_ELEMS
    # Each half multiply-adds in the shape it was decoded in (quant's "Triton decoders"), summed once at the end.
    # Unlike the dense loop, no group is decoded ahead of its use: compiled for an H200, that pipelining gave wrong
    # sums for the types with an offset (d * q + m), and was slower.
    pdl.enter(PDL)
    low, low_cols, high, high_cols = quant.decode(w_ptr, row_off, 0, row_mask, QTYPE, NB, n_blocks)  # group 0
    acc_low = low * _x_at(x_ptr, K, low_cols, None, GATED)  # [BLOCK_N, NB, ...]
    acc_high = high * _x_at(x_ptr, K, high_cols, None, GATED)
    for g in range(1, n_groups):
        low, _, high, _ = quant.decode(w_ptr, row_off, g * NB, row_mask, QTYPE, NB, n_blocks)
        acc_low += low * _x_at(x_ptr, K, g * GROUP + low_cols, None, GATED)
        acc_high += high * _x_at(x_ptr, K, g * GROUP + high_cols, None, GATED)
    y = _row_sums(acc_low) + _row_sums(acc_high)  # [BLOCK_N]
    for block in range(n_groups * NB, n_blocks):  # the last n_blocks % NB blocks, one at a time
        # (names of their own: a loop's variables keep one shape, and these blocks' differs from the groups')
        one_low, one_low_cols, one_high, one_high_cols = quant.decode(w_ptr, row_off, block, row_mask, QTYPE, 1,
                                                                          n_blocks)
        one_x_low = _x_at(x_ptr, K, block * BLOCK_ELEMS + one_low_cols, None, GATED)
        one_x_high = _x_at(x_ptr, K, block * BLOCK_ELEMS + one_high_cols, None, GATED)
        y += _row_sums(one_low * one_x_low) + _row_sums(one_high * one_x_high)
    y = _epilogue(y, rows, rows, row_mask, b_ptr, r_ptr, out_ptr, residual_scale, dtype, HAS_BIAS, RESIDUAL)
    if ARGMAX:
        _pack_argmax(y, rows, row_mask, N, best_ptr, SLOTS)


@triton.jit
def _dot_gemv_kernel(xq_ptr, xd_ptr, xs_ptr, w_ptr, b_ptr, r_ptr, out_ptr, best_ptr, N, K, row_bytes, residual_scale,
                     DTYPE: tl.constexpr, QTYPE: tl.constexpr, BLOCK_ELEMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     RESIDUAL: tl.constexpr, ARGMAX: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
                     NB: tl.constexpr, HARDWARE: tl.constexpr, PDL: tl.constexpr):
    # The packed GEMV of x rounded by quant.round_x (xq_ptr, xd_ptr and xs_ptr its int8 values, scales and sums,
    # as int32 words); DTYPE is x's dtype, which the output is rounded to. Each step takes NB blocks of each row
    # side by side, the last step's blocks past the row's end masked.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < N
    row_off = tl.minimum(rows, N - 1).to(tl.int64) * row_bytes  # [BLOCK_N] (rows past N read the last, unstored)
    n_blocks = K // BLOCK_ELEMS
    pdl.enter(PDL)
    acc = quant.dot(w_ptr, row_off, 0, QTYPE, NB, n_blocks, xq_ptr, xd_ptr, xs_ptr, HARDWARE)
    for block in range(NB, n_blocks, NB):
        acc += quant.dot(w_ptr, row_off, block, QTYPE, NB, n_blocks, xq_ptr, xd_ptr, xs_ptr, HARDWARE)
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    y = _epilogue(y, rows, rows, row_mask, b_ptr, r_ptr, out_ptr, residual_scale, DTYPE, HAS_BIAS, RESIDUAL)
    if ARGMAX:
        _pack_argmax(y, rows, row_mask, N, best_ptr, SLOTS)


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
    return torch.full((ARGMAX_SLOTS,), EMPTY_ARGMAX, dtype=torch.int64, device=device)


def take_argmax(best: torch.Tensor, token: torch.Tensor, advance: torch.Tensor | None = None) -> None:
    """Write the row index packed in the argmax buffer `best` into token (int64 [1]) and empty the buffer; add 1
    to every element of `advance` (contiguous int32: the positions of a decode graph, moved on to the token's)."""
    assert advance is None or (advance.dtype == torch.int32 and advance.is_contiguous())
    n = 0 if advance is None else advance.numel()
    _take_argmax_kernel[(1,)](best, token, best if advance is None else advance, n, SLOTS=ARGMAX_SLOTS,
                              ADVANCE=advance is not None, BLOCK_ADVANCE=triton.next_power_of_2(max(n, 1)))


def group_blocks(n_blocks: int, max_blocks: int) -> int:
    """NB, the blocks a packed kernel decodes per step of a row of n_blocks blocks: the power of two up to
    max_blocks and n_blocks (at least 1: a row has one group at least) that walks the row in the fewest steps
    (n_blocks // NB groups, then the rest one block at a time), the larger one on ties."""
    return min((1 << i for i in range(max(1, min(max_blocks, n_blocks)).bit_length())),
               key=lambda nb: (n_blocks // nb + n_blocks % nb, -nb))


def integer_dot(qt: quant.QuantType, row_bytes: int) -> bool:
    """Whether the one-row GEMV of a weight of rows of row_bytes bytes of qt runs the integer dot products: for
    quant.DOT_TYPES whose rows keep their quant words 4-byte aligned (a Q8_0 or Q6_K row of an odd number of blocks
    does not: Qwen2.5-0.5B's down projection, 19 Q6_K blocks, runs the float decoders)."""
    return qt.name in quant.DOT_TYPES and row_bytes % 4 == 0


DOT_THREADS = 128  # threads of an integer-dot program (4 warps), each taking one (row, block) per step


def dot_blocks(n_blocks: int, max_blocks: int = 64) -> int:
    """NB of the integer-dot GEMV for rows of n_blocks blocks, the blocks of a row its threads take side by side
    per step: the largest power of two up to max_blocks whose steps pad the row by at most a third (the last step's
    blocks past the row's end are masked, their threads idle)."""
    nb = 1
    while nb < max_blocks and -(-n_blocks // (2 * nb)) * 2 * nb * 3 <= 4 * n_blocks:
        nb *= 2
    return nb


def packed_tile(qt: quant.QuantType, n_blocks: int, dot: bool) -> tuple[int, int, int]:
    """(block_n, block_k, num_warps) of the packed GEMV for rows of n_blocks blocks of qt, by integer dot
    products or not: rows per program, elements of each row per step, and warps. The float path's are the best of
    sweeps on an H200 at the Llama-3-8B shapes (BENCHMARKS.md); the integer dot's give each of DOT_THREADS threads
    one (row, block), at most 16 blocks of a row side by side for the chunked K-quants (in an H200 sweep of their
    Llama-3-8B shapes, 8 rows of 16 blocks was the best tile or within 12% of it)."""
    if dot:
        nb = dot_blocks(n_blocks, 16 if qt.name in quant.CHUNKED else 64)
        return max(1, DOT_THREADS // nb), nb * qt.block_elems, DOT_THREADS // 32
    if qt.name in ("Q6_K", "Q8_0"):
        return 8, 512, 4
    return (4, 1024, 4) if qt.block_elems == 256 else (4, 512, 4)


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _packed_shape(weight: torch.Tensor, qtype) -> tuple[quant.QuantType, int, int]:
    """The QuantType, N and K of a packed weight uint8 [N, row_bytes]."""
    qt = quant.quant_type(qtype)
    assert weight.dtype == torch.uint8 and weight.dim() == 2 and weight.is_contiguous()
    return qt, weight.shape[0], qt.row_elems(weight.shape[1])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
         residual: torch.Tensor | None = None, residual_scale: float = 1.0, argmax: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, qtype=None, rounded: tuple | None = None,
         block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """`reference` for x [1, K] (or [1, 2K] gated; of x_hat where `integer_dot`, see above) with a contiguous last
    dim; weight [N, K] contiguous, or with qtype uint8 [N, row_bytes] contiguous in quant's kernel layout;
    residual [1, N] -> new [1, N]; argmax: an argmax_buffer to pack the output's argmax into; out_dtype: the
    output's dtype (default x's; the values are rounded to x's dtype either way: float32 saves logits a cast);
    rounded: quant.round_x(x, gated) computed already (by the RMSNorm before, or shared by a Concat's parts), read
    where the integer dot runs. A
    program reads block_n rows, block_k elements of each per step (packed: NB = block_k // block_elems blocks by
    integer dot products, else group_blocks(blocks of a row, that)); they default to 4 and 1024, or to packed_tile
    for a packed weight. Warps default to 4, or 8 for a dense weight when gated (the SiLU of each x tile; faster in
    the decode step, BENCHMARKS.md), or packed_tile's."""
    if qtype is None:
        N, K = weight.shape
        assert weight.is_contiguous()
        tile = (4, 1024, 8 if gated else 4)
    else:
        qt, N, K = _packed_shape(weight, qtype)
        dot = integer_dot(qt, weight.shape[1])
        tile = packed_tile(qt, K // qt.block_elems, dot)
    block_n, block_k, num_warps = block_n or tile[0], block_k or tile[1], num_warps or tile[2]
    assert x.shape == (1, 2 * K if gated else K) and x.stride(1) == 1
    assert residual is None or (residual.shape == (1, N) and residual.is_contiguous())
    assert argmax is None or (argmax.shape == (ARGMAX_SLOTS,) and argmax.dtype == torch.int64)
    out = torch.empty(1, N, dtype=out_dtype or x.dtype, device=x.device)  # [1, N]
    common = (weight if bias is None else bias, weight if residual is None else residual, out,
              out if argmax is None else argmax)
    flags = dict(HAS_BIAS=bias is not None, RESIDUAL=residual is not None, ARGMAX=argmax is not None,
                 SLOTS=ARGMAX_SLOTS, BLOCK_N=block_n, num_warps=num_warps, **pdl.launch(x.device))
    grid = (triton.cdiv(N, block_n),)
    if qtype is None:
        _gemv_kernel[grid](x, weight, *common, N, K, residual_scale, GATED=gated,
                           BLOCK_K=min(block_k, triton.next_power_of_2(K)), **flags)
        return out
    if dot:
        xq, xd, xs = rounded or quant.round_x(x, gated)  # [K] int8, [K / 32], [K / 16]
        _dot_gemv_kernel[grid](xq.view(torch.int32), xd.view(torch.int32), xs.view(torch.int32), weight, *common, N,
                               K, weight.shape[1], residual_scale, DTYPE=_TRITON_DTYPES[x.dtype], QTYPE=qt.name,
                               BLOCK_ELEMS=qt.block_elems, NB=block_k // qt.block_elems, HARDWARE=x.is_cuda,
                               **flags)
    else:
        nb = group_blocks(K // qt.block_elems, block_k // qt.block_elems)
        _packed_gemv_kernel[grid](x, weight, *common, N, K, weight.shape[1], residual_scale, QTYPE=qt.name,
                                  BLOCK_ELEMS=qt.block_elems, GATED=gated, NB=nb, **flags)
    return out


@triton.jit
def _multiply_add(x, w, acc, dtype: tl.constexpr):
    """acc [BLOCK_T, BLOCK_N] + x [BLOCK_T, E] @ w [BLOCK_N, E]^T (E >= 16, as tl.dot needs), both fp32 rounded
    to dtype first (x's values are dtype's already; fp32: exact fp32 products)."""
    x = x.to(dtype)
    w = w.to(dtype)
    if dtype == tl.float32:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _multiply_add_half(x_rows, K, start, t_mask, w, cols, acc, dtype: tl.constexpr):
    """acc [BLOCK_T, BLOCK_N] plus the x rows' elements at start + cols times a decoded half w (see quant.decode)."""
    w, cols = quant.flat(w, cols)  # [BLOCK_N, E], [E]
    x = _x_at(x_rows, K, start + cols[None, :], t_mask, False)  # [BLOCK_T, E]
    return _multiply_add(x, w, acc, dtype)


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, T, N, K, row_bytes, stride_x, residual_scale,
                        QTYPE: tl.constexpr, BLOCK_ELEMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                        RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                        PDL: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] weight rows: output columns
    n_mask = n < N
    t = tl.arange(0, BLOCK_T)  # [BLOCK_T] x rows, padded
    t_mask = (t < T)[:, None]  # [BLOCK_T, 1]
    x_rows = x_ptr + t[:, None] * stride_x  # [BLOCK_T, 1]
    row_off = n.to(tl.int64) * row_bytes  # [BLOCK_N]
    n_blocks = K // BLOCK_ELEMS
    n_groups = n_blocks // NB
    GROUP: tl.constexpr = NB * BLOCK_ELEMS
    pdl.enter(PDL)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for g in range(0, n_groups):  # as in the one-row kernel, each group decoded where it is used
        low, low_cols, high, high_cols = quant.decode(w_ptr, row_off, g * NB, n_mask, QTYPE, NB, n_blocks)
        acc = _multiply_add_half(x_rows, K, g * GROUP, t_mask, low, low_cols, acc, dtype)
        acc = _multiply_add_half(x_rows, K, g * GROUP, t_mask, high, high_cols, acc, dtype)
    for block in range(n_groups * NB, n_blocks):  # the last n_blocks % NB blocks, one at a time
        one_low, one_low_cols, one_high, one_high_cols = quant.decode(w_ptr, row_off, block, n_mask, QTYPE, 1, n_blocks)
        acc = _multiply_add_half(x_rows, K, block * BLOCK_ELEMS, t_mask, one_low, one_low_cols, acc, dtype)
        acc = _multiply_add_half(x_rows, K, block * BLOCK_ELEMS, t_mask, one_high, one_high_cols, acc, dtype)
    _epilogue(acc, n[None, :], t[:, None] * N + n[None, :], t_mask & n_mask[None, :], b_ptr, r_ptr, out_ptr,
              residual_scale, dtype, HAS_BIAS, RESIDUAL)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, qtype, bias: torch.Tensor | None = None,
                gated: bool = False, residual: torch.Tensor | None = None, residual_scale: float = 1.0,
                block_n: int = 32, block_k: int = 512, num_warps: int = 4) -> torch.Tensor:
    """`reference` for a few rows (speculative verification, short prefill chunks): x [T, K] (or [T, 2K] gated),
    1 <= T <= 16, with a contiguous last dim; weight uint8 [N, row_bytes] of qtype, contiguous; residual [T, N]
    contiguous -> new [T, N]. Each program decodes block_n weight rows, block_k elements at a time (as gemv),
    and multiplies them with all T rows (padded to 16) on the tensor cores. The default tile is the best for every
    packed type of a Q4_K_M file in an H200 sweep at the Llama-3-8B shapes (BENCHMARKS.md). Gated x goes through
    activation.silu_mul first: read inside, every program would recompute the SiLU of all T rows, and the two
    fp32 x tiles crowd out the decoded weights' registers.

    Equal to `reference` up to the order of the fp32 sums for fp32 x (exact fp32 products, on the FMA units: a
    precision mode, slow on a GPU). For fp16/bf16 x each dequantized weight is rounded to x's dtype before its
    product: before the output's rounding, |y - reference| <= u * sum_k |w_k x_k| (u = 2^-11 for fp16, 2^-8 for
    bf16) plus the fp32 sums' own rounding, then one rounding of the output."""
    qt, N, K = _packed_shape(weight, qtype)
    T = x.shape[0]
    assert 1 <= T <= SKINNY_MAX_ROWS and x.shape == (T, 2 * K if gated else K) and x.stride(1) == 1
    assert residual is None or (residual.shape == (T, N) and residual.is_contiguous())
    if gated:
        x = activation.silu_mul(x)  # [T, K]
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)  # [T, N]
    nb = group_blocks(K // qt.block_elems, block_k // qt.block_elems)
    _skinny_gemm_kernel[(triton.cdiv(N, block_n),)](
        x, weight, weight if bias is None else bias, weight if residual is None else residual, out, T, N, K,
        weight.shape[1], x.stride(0), residual_scale, QTYPE=qt.name, BLOCK_ELEMS=qt.block_elems,
        HAS_BIAS=bias is not None, RESIDUAL=residual is not None, BLOCK_T=SKINNY_MAX_ROWS, BLOCK_N=block_n,
        NB=nb, num_warps=num_warps, **pdl.launch(x.device))
    return out
