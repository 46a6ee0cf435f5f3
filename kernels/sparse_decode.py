"""Block-sparse attention for decode and speculative verification (split-K / flash-decoding).

q [Hq, T, d] holds T (1..MAX_QUERIES) queries at positions L-T..L-1 that share one selection per kv head:
block_idx [Hkv, 1, max_sel], block_count [Hkv, 1] (the prefill layout with a single tile), or no
selection at all (dense: every block 0..cdiv(L, block_size)-1). The T queries are causal among
themselves. Semantics: `reference` (= sparse_attention.reference with q_start = L-T and one tile).
With block_idx [Hkv, T, max_sel], block_count [Hkv, T] each query attends its own blocks, exactly as
a call for that query alone at its position would (the same tiles and splits: the same bits), which
speculative verification needs.

The kernels read L from a device int32 [1] tensor and size nothing from its value: the grid and the
scratch come from capacities (max_sel, or the cache length in dense mode), so one CUDA graph replays
at any L the cache holds.

Pass 1, one program per (kv head, split), or per (kv head, split, query) with a selection per query:
the G*T rows of the group (row r = t*G + j), or the query's G rows, run online softmax over a
contiguous share of the attended blocks (the share computed from the live count) and write an
unnormalised partial (acc, m, l) in fp32 scratch; a split past the live blocks writes m = -inf,
l = 0. Pass 2, one program per (kv head, row): merge the splits.
"""

import math

import torch
import triton
import triton.language as tl

from infer.kernels import pdl, sparse_attention

MAX_QUERIES = 8  # the most queries one call takes: a decode step, or a speculative verification of 7 drafts

@triton.jit
def _sparse_decode_split(
    q_ptr, k_ptr, v_ptr, len_ptr, idx_ptr, cnt_ptr, acc_ptr, m_ptr, l_ptr,
    stride_qh, stride_qt, stride_kh, stride_kt, stride_vh, stride_vt, stride_ih, stride_it, stride_ch, stride_ct,
    T, rows_per_program, qk_scale,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    SCRATCH_M: tl.constexpr, BLOCK_N: tl.constexpr, DENSE: tl.constexpr, PDL: tl.constexpr,
):
    """Dense (idx_ptr, cnt_ptr None): the attended blocks are 0..cdiv(L, BLOCK_SIZE)-1. Program (kvh, split, tq)
    takes the rows tq * GROUP + (0..rows_per_program-1) and the selection of tile tq (one tile, tq = 0, when
    the queries share it)."""
    pdl.enter(PDL)
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    tq = tl.program_id(2)
    n_splits = tl.num_programs(1)
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N  # kernel steps per selected block

    L = tl.load(len_ptr)  # keys 0..L-1 are live
    j = tl.arange(0, BLOCK_M)
    rows = tq * GROUP + j  # [BLOCK_M] row = t * GROUP + head in group
    t = rows // GROUP
    h = kvh * GROUP + rows % GROUP
    row_ok = j < rows_per_program
    qpos = L - T + t  # [BLOCK_M] absolute position
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(q_ptr + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    n_sel = tl.cdiv(L, BLOCK_SIZE) if DENSE else tl.load(cnt_ptr + kvh * stride_ch + tq * stride_ct)
    per_split = tl.cdiv(n_sel, n_splits)
    start = split * per_split
    end = tl.minimum(start + per_split, n_sel)  # empty (end <= start) past the live blocks
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for i in range(start * SUB, end * SUB):
        blk = i // SUB if DENSE else tl.load(idx_ptr + kvh * stride_ih + tq * stride_it + i // SUB)
        kpos = blk * BLOCK_SIZE + (i % SUB) * BLOCK_N + offs_n  # [BLOCK_N]
        k = tl.load(k_base + kpos[None, :] * stride_kt + offs_d[:, None],
                    mask=kpos[None, :] < L, other=0.0)  # [D, BLOCK_N]
        s = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(kpos[None, :] <= qpos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kpos[:, None] * stride_vt + offs_d[None, :],
                    mask=kpos[:, None] < L, other=0.0)  # [BLOCK_N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    part = (kvh * n_splits + split) * SCRATCH_M + rows  # [BLOCK_M] row of the scratch; padding rows stay unwritten
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)


@triton.jit
def _sparse_decode_reduce(
    acc_ptr, m_ptr, l_ptr, o_ptr, stride_oh, stride_ot, n_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SCRATCH_M: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    kvh = tl.program_id(0)
    row = tl.program_id(1)  # t * GROUP + j
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < n_splits
    part = (kvh * n_splits + offs_s) * SCRATCH_M + row  # [BLOCK_S]
    m = tl.load(m_ptr + part, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    l = tl.load(l_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)  # [BLOCK_S, D]
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # [BLOCK_S], 0 for empty splits
    l_tot = tl.sum(l * w, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(l_tot == 0.0, 1.0, l_tot)  # [D], no visible key -> 0
    h = kvh * GROUP + row % GROUP
    tl.store(o_ptr + h * stride_oh + (row // GROUP) * stride_ot + offs_d, o.to(o_ptr.dtype.element_ty))


def reference(q, k_cache, v_cache, L, block_idx=None, block_count=None, block_size=64, sm_scale=None):
    """Exact semantics in plain PyTorch (fp32 result): the prefill reference for one tile of T queries, or for each
    query alone when the selection has one tile per query.

    L: int or int32 [1] tensor (read on the host); block_idx, block_count None: every block of 0..L-1."""
    T, Hkv, L = q.shape[1], k_cache.shape[0], int(L)
    if block_idx is not None and T > 1 and block_idx.shape[1] == T:
        return torch.cat([reference(q[:, t:t + 1], k_cache, v_cache, L - T + t + 1, block_idx[:, t:t + 1],
                                    block_count[:, t:t + 1], block_size, sm_scale) for t in range(T)], 1)
    if block_idx is None:
        block_idx, block_count = sparse_attention.every_block(Hkv, 1, L, block_size, q.device)  # [Hkv, 1, n], [Hkv, 1]
    return sparse_attention.reference(q, k_cache, v_cache, L - T, block_idx, block_count,
                                      q_tile=T, block_size=block_size, sm_scale=sm_scale)


def choose_num_splits(max_sel, n_kv_heads, target_programs):
    """Splits per kv head so that n_kv_heads * splits ~ target_programs, at most max_sel.

    max_sel is a capacity (the selection width, or the cache's blocks in dense mode), not the live count,
    so no host sync (CUDA-graph friendly)."""
    return max(1, min(max_sel, triton.cdiv(target_programs, n_kv_heads)))


def sparse_decode(q, k_cache, v_cache, L, block_idx=None, block_count=None, block_size=64, sm_scale=None,
                  out=None, num_splits=None, target_programs=264, block_n=None, num_warps=4, num_stages=3):
    """Block-sparse attention of T (1..MAX_QUERIES) queries at positions L-T..L-1 (semantics: `reference`).

    q [Hq, T, d]; k_cache, v_cache [Hkv, max_len, d] with keys 0..L-1 live. L: int, or int32 [1] tensor on
    q's device whose value the kernels read (never the host: no sync, and a captured CUDA graph replays at
    whatever L the tensor holds, T <= L <= max_len). block_idx int32 [Hkv, 1, max_sel], block_count int32
    [Hkv, 1], the blocks of all T queries, or [Hkv, T, max_sel] and [Hkv, T], each query's own; both None:
    dense, every block 0..cdiv(L, block_size)-1. Returns o [Hq, T, d] in q's dtype
    (into `out` when given). num_splits defaults to choose_num_splits(max_sel, Hkv, target_programs), with
    max_sel = cdiv(max_len, block_size) in dense mode; target_programs=264 is two programs per SM on an H100 (the
    defaults as measured: BENCHMARKS.md).
    """
    Hq, T, d = q.shape
    Hkv, max_len = k_cache.shape[:2]
    assert T <= MAX_QUERIES
    dense = block_idx is None
    assert dense == (block_count is None)
    block_n = block_n or min(64, block_size)
    assert Hq % Hkv == 0 and d == triton.next_power_of_2(d) and block_size % block_n == 0
    if dense:
        max_sel = triton.cdiv(max_len, block_size)
    else:
        max_sel, n_tiles = block_idx.shape[2], block_idx.shape[1]
        assert n_tiles in (1, T) and block_idx.shape[0] == Hkv and block_idx.stride(2) == 1
        assert block_count.shape == (Hkv, n_tiles)
    per_query = not dense and T > 1 and n_tiles == T
    if isinstance(L, int):
        assert T <= L <= max_len
        L = torch.full((1,), L, dtype=torch.int32, device=q.device)
    assert L.shape == (1,) and L.dtype == torch.int32 and L.device == q.device
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    G = Hq // Hkv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    num_splits = choose_num_splits(max_sel, Hkv, target_programs) if num_splits is None else num_splits
    rows = G if per_query else G * T  # per program
    scratch_m = max(16, triton.next_power_of_2(G * T))
    o = torch.empty_like(q) if out is None else out  # [Hq, T, d]
    assert o.shape == q.shape and o.stride(2) == 1

    acc = torch.empty(Hkv, num_splits, scratch_m, d, dtype=torch.float32, device=q.device)  # partial sums
    m = torch.empty(Hkv, num_splits, scratch_m, dtype=torch.float32, device=q.device)  # partial max, log2
    l = torch.empty_like(m)  # partial denominators
    _sparse_decode_split[(Hkv, num_splits, T if per_query else 1)](
        q, k_cache, v_cache, L, block_idx, block_count, acc, m, l,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        *((0, 0, 0, 0) if dense else (*block_idx.stride()[:2], *block_count.stride())),
        T, rows, sm_scale * sparse_attention.LOG2E,
        GROUP=G, BLOCK_SIZE=block_size, HEAD_DIM=d, BLOCK_M=max(16, triton.next_power_of_2(rows)),  # tl.dot: M >= 16
        SCRATCH_M=scratch_m, BLOCK_N=block_n, DENSE=dense, num_warps=num_warps, num_stages=num_stages,
        **pdl.launch(q.device),
    )
    _sparse_decode_reduce[(Hkv, G * T)](
        acc, m, l, o, o.stride(0), o.stride(1), num_splits,
        GROUP=G, HEAD_DIM=d, SCRATCH_M=scratch_m, BLOCK_S=triton.next_power_of_2(num_splits), **pdl.launch(q.device),
    )
    return o
