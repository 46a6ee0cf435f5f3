"""Top-k selection of KV blocks per GQA group from pooled key summaries (InfLLM-V2 style).

Queries q [Hq, T, d] sit at absolute positions q_start .. q_start+T-1, so L = q_start + T keys exist and the
summaries (see pool_keys) of all num_summaries(L) complete windows must have been written.

Score of (kv head g, query t, summary c): softmax over the summaries visible to t (c*stride + kernel - 1 <= p)
of sm_scale * q[h, t] . summary[g, c], summed over the G query heads h of group g. Block b ([b*B, (b+1)*B))
scores the max over the summaries whose window overlaps it; a query tile scores the max over its queries.
Per (g, tile) the first init_blocks blocks and the blocks overlapping [p_lo - window + 1, p_hi] are forced;
the topk best causal blocks are kept (forced ones first, all forced ones if they alone exceed topk), blocks
without a score only when forced. Output: block_idx [Hkv, n_tiles, max_sel] ascending, -1 padded, and
block_count [Hkv, n_tiles], both int32.

GPU (block_select), three launches and no host sync, each from a thin launcher over a SelectPlan (the call's
sizes and grids, computed once from its shape) and a Tuning: pass 1 computes each (head, query) row's log-sum-exp
over its visible summaries (split over programs when there are few rows, as in decode); pass 2 recomputes the
logits and writes, per (kv head, t-block of queries, summary), the probabilities summed over the group's heads and
maxed over the queries; pass 3, one program per (kv head, tile), max-pools those to blocks, forces the sink and
window blocks (+inf) and keeps the top ones by a radix select on the float bits (ties: lowest block first). Up to
DECODE_LOGITS_MAX_T queries (decode), pass 1 also stores the logits and pass 3 computes the probabilities from
them itself: two launches. Decode's single tile also splits pass 3 over chunks of tuning.select_lanes blocks,
each keeping its own top ones, and the last chunk to finish selects among those (a counter per tile in the
caller's `tickets`). Speculative verification (per_query) runs those two launches for all its queries at once,
each query at its own start as if alone. On CPU the engine uses reference_scores and select_blocks, the same
selection in plain torch.

The kernels read q_start from a device int32 [1] tensor and derive the live counts (summaries, blocks, each split's
share of the summaries) from it. The host sizes grids and scratch either to the live counts (an int q_start) or to
capacities (a tensor q_start, decode: a CUDA graph captured once replays at any length); programs and blocks past
the live ones do no work and select nothing, so both give the same bits.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from infer.kernels import pdl
from infer.kernels.pool_keys import num_summaries, num_summaries_on_device
from infer.kernels.sparse_decode import MAX_QUERIES

def max_selected(topk: int = 64, window: int = 2048, block_size: int = 64, q_tile: int = 64, init_blocks: int = 1) -> int:
    """Width of block_idx: topk, or the most forced blocks a query tile can have if that is larger."""
    span = window + q_tile - 1  # positions of the local window of a whole tile
    return max(topk, init_blocks + (span + block_size - 2) // block_size + 1)


def reference_scores(
    q: torch.Tensor, summaries: torch.Tensor, q_start: int,
    kernel: int = 32, stride: int = 16, block_size: int = 64, q_tile: int = 64, sm_scale: float | None = None,
) -> torch.Tensor:
    """Tile-block scores [Hkv, n_tiles, n_blocks] (fp32, -inf = no score), materializing everything."""
    Hq, T, d = q.shape
    Hkv = summaries.shape[0]
    G = Hq // Hkv
    L = q_start + T
    C = num_summaries(L, kernel, stride)
    assert C <= summaries.shape[1]
    n_blocks = triton.cdiv(L, block_size)
    n_tiles = triton.cdiv(T, q_tile)
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    if C == 0:
        return torch.full((Hkv, n_tiles, n_blocks), -math.inf, device=q.device)
    s = summaries[:, :C].float().repeat_interleave(G, 0)  # [Hq, C, d]
    logits = q.float() @ s.transpose(1, 2) * sm_scale  # [Hq, T, C]
    pos = q_start + torch.arange(T, device=q.device)  # [T]
    c = torch.arange(C, device=q.device)  # [C]
    visible = c[None, :] * stride + kernel - 1 <= pos[:, None]  # [T, C]
    probs = logits.masked_fill(~visible, -math.inf).softmax(-1)  # [Hq, T, C]
    score = probs.view(Hkv, G, T, C).sum(1).masked_fill(~visible, -math.inf)  # [Hkv, T, C]
    b = torch.arange(n_blocks, device=q.device)  # [n_blocks]
    overlap = (c[None, :] * stride < (b[:, None] + 1) * block_size) & (
        c[None, :] * stride + kernel > b[:, None] * block_size
    )  # [n_blocks, C]
    block = torch.where(overlap, score[:, :, None, :], -math.inf).amax(-1)  # [Hkv, T, n_blocks]
    block = torch.nn.functional.pad(block, (0, 0, 0, n_tiles * q_tile - T), value=-math.inf)
    return block.view(Hkv, n_tiles, q_tile, n_blocks).amax(2)  # [Hkv, n_tiles, n_blocks]


def reference(
    q: torch.Tensor, summaries: torch.Tensor, q_start: int,
    kernel: int = 32, stride: int = 16, block_size: int = 64, q_tile: int = 64,
    topk: int = 64, init_blocks: int = 1, window: int = 2048, sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_idx [Hkv, n_tiles, max_sel], block_count [Hkv, n_tiles]), selecting with plain Python loops."""
    T = q.shape[1]
    score = reference_scores(q, summaries, q_start, kernel, stride, block_size, q_tile, sm_scale)
    Hkv, n_tiles, n_blocks = score.shape
    max_sel = max_selected(topk, window, block_size, q_tile, init_blocks)
    block_idx = torch.full((Hkv, n_tiles, max_sel), -1, dtype=torch.int32, device=q.device)
    block_count = torch.zeros((Hkv, n_tiles), dtype=torch.int32, device=q.device)
    for i in range(n_tiles):
        p_lo = q_start + i * q_tile
        p_hi = q_start + min((i + 1) * q_tile, T) - 1
        causal = [b for b in range(n_blocks) if b * block_size <= p_hi]
        forced = {b for b in causal if b < init_blocks or (b + 1) * block_size - 1 >= p_lo - window + 1}
        for g in range(Hkv):
            s = score[g, i].tolist()
            scored = sorted((b for b in causal if b not in forced and s[b] > -math.inf), key=lambda b: -s[b])
            chosen = sorted(forced | set(scored[: max(0, topk - len(forced))]))
            block_idx[g, i, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            block_count[g, i] = len(chosen)
    return block_idx, block_count


@triton.jit
def _n_visible(p, KERNEL: tl.constexpr, STRIDE: tl.constexpr):
    """How many summaries the query at position p sees (c*STRIDE + KERNEL - 1 <= p): those of p + 1 keys."""
    return num_summaries_on_device(p + 1, KERNEL, STRIDE)


@triton.jit
def _splits(q_start, T, max_splits, KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """(summaries per split, splits that hold any): the live summaries num_summaries(q_start + T) cut into at most
    max_splits runs of whole BLOCK_C chunks."""
    n_chunks = tl.cdiv(_n_visible(q_start + T - 1, KERNEL, STRIDE), BLOCK_C)
    chunks_per_split = tl.maximum(tl.cdiv(n_chunks, max_splits), 1)
    return chunks_per_split * BLOCK_C, tl.cdiv(n_chunks, chunks_per_split)


@triton.jit
def _summary_range(q_start, T, tb, max_splits,
                   KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Summaries [c_lo, c_hi) of this program's split (axis 2) that the last query of t-block tb sees; [c_lo, c_mid)
    are whole BLOCK_C chunks that every query of the t-block sees (no masking needed). A split past the live
    summaries is empty."""
    c_per_split, _ = _splits(q_start, T, max_splits, KERNEL, STRIDE, BLOCK_C)
    p_first = q_start + tb * BLOCK_T
    p_last = q_start + tl.minimum(tb * BLOCK_T + BLOCK_T, T) - 1
    c_lo = tl.program_id(2) * c_per_split
    c_hi = tl.minimum(c_lo + c_per_split, _n_visible(p_last, KERNEL, STRIDE))
    c_all = tl.minimum(c_hi, _n_visible(p_first, KERNEL, STRIDE))
    return c_lo, c_lo + tl.maximum(c_all - c_lo, 0) // BLOCK_C * BLOCK_C, c_hi


@triton.jit
def _load_queries(q_ptr, g, tb, T, stride_qh, stride_qt, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """Queries of kv head g's heads in t-block tb, one (head hl, query t) pair per row:
    (q [BLOCK_G*BLOCK_T, BLOCK_D], hl, t, row valid), the last three [BLOCK_G*BLOCK_T]."""
    offs_r = tl.arange(0, BLOCK_G * BLOCK_T)
    if HEAD_MAJOR:
        hl, t = offs_r // BLOCK_T, tb * BLOCK_T + offs_r % BLOCK_T
    else:
        hl, t = offs_r % BLOCK_G, tb * BLOCK_T + offs_r // BLOCK_G
    row_ok = (hl < G) & (t < T)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + (g * G + hl)[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    return q, hl, t, row_ok


@triton.jit
def _load_summaries(s_ptr, g, c0, c_hi, stride_sh, stride_sc,
                    D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(summaries c0 .. c0+BLOCK_C-1 of kv head g [BLOCK_C, BLOCK_D], 0 from c_hi on; their ids [BLOCK_C])."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    s = tl.load(s_ptr + g * stride_sh + offs_c[:, None] * stride_sc + offs_d[None, :],
                mask=(offs_c < c_hi)[:, None] & (offs_d < D)[None, :], other=0.0)
    return s, offs_c


@triton.jit
def _merge_lse(parts):
    """Pass 1's partial log2-sum-exp2s parts [rows, BLOCK_S] (-inf: an empty or absent split) -> [rows], -inf
    where nothing is visible."""
    m = tl.max(parts, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log2(tl.sum(tl.exp2(parts - m[:, None]), axis=1))


@triton.jit
def _online_lse(m, l, x):
    """Fold logits x [rows, BLOCK_C] into the running max m and sum l (log2 domain) of each row."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    return m_new, l * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)


@triton.jit
def _query_and_block(PER_QUERY: tl.constexpr):
    """(query, block) of this program's axis 1: with PER_QUERY the query, which then runs as a call of its own (its
    block index 0); else every query reads start[0] and axis 1 is the t-block or tile."""
    if PER_QUERY:
        return tl.program_id(1), 0
    else:
        return 0, tl.program_id(1)


@triton.jit
def _lse_kernel(
    q_ptr, s_ptr, lse_ptr, x_ptr, start_ptr, T, max_splits, qk_scale,
    stride_qh, stride_qt, stride_sh, stride_sc, stride_lh, stride_lt, stride_xh, stride_xt,
    G: tl.constexpr, D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_MAJOR: tl.constexpr, STORE_LOGITS: tl.constexpr, PER_QUERY: tl.constexpr, PDL: tl.constexpr,
):
    """Pass 1: log2-sum-exp2 of each (head, query) row over the visible summaries of one split; with STORE_LOGITS
    also the logits themselves (log2 domain, -inf where not visible). PER_QUERY: axis 1 is the query, each one a
    call with T = 1 at its own start."""
    pdl.enter(PDL)
    g, split = tl.program_id(0), tl.program_id(2)
    query, tb = _query_and_block(PER_QUERY)
    q_start = tl.load(start_ptr + query)
    q_ptr += query * stride_qt
    lse_ptr += query * stride_lt
    x_ptr += query * stride_xt
    q, hl, t, row_ok = _load_queries(q_ptr, g, tb, T, stride_qh, stride_qt, G, D, BLOCK_G, BLOCK_T, BLOCK_D,
                                     HEAD_MAJOR)
    pos = q_start + t  # [rows]
    x_rows = x_ptr + (g * G + hl) * stride_xh + t * stride_xt  # [rows]
    c_lo, c_mid, c_hi = _summary_range(q_start, T, tb, max_splits, KERNEL, STRIDE, BLOCK_T, BLOCK_C)
    m = tl.full([BLOCK_G * BLOCK_T], -1e30, tl.float32)  # finite, so fully masked chunks give exp2(-inf) = 0
    l = tl.zeros([BLOCK_G * BLOCK_T], tl.float32)
    for c0 in range(c_lo, c_mid, BLOCK_C):  # every query sees the whole chunk
        s, offs_c = _load_summaries(s_ptr, g, c0, c_hi, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
        x = tl.dot(q, tl.trans(s)) * qk_scale  # [rows, BLOCK_C]
        m, l = _online_lse(m, l, x)
        if STORE_LOGITS:
            tl.store(x_rows[:, None] + offs_c[None, :], x, mask=row_ok[:, None])
    for c0 in range(c_mid, c_hi, BLOCK_C):
        s, offs_c = _load_summaries(s_ptr, g, c0, c_hi, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
        visible = (offs_c[None, :] * STRIDE + KERNEL - 1 <= pos[:, None]) & (offs_c < c_hi)[None, :]
        x = tl.where(visible, tl.dot(q, tl.trans(s)) * qk_scale, float("-inf"))
        m, l = _online_lse(m, l, x)
        if STORE_LOGITS:
            tl.store(x_rows[:, None] + offs_c[None, :], x, mask=row_ok[:, None] & (offs_c < c_hi)[None, :])
    lse = tl.where(l > 0, m + tl.log2(tl.maximum(l, 1.0)), float("-inf"))  # l >= 1 once a summary is visible
    tl.store(lse_ptr + (g * G + hl) * stride_lh + t * stride_lt + split, lse, mask=row_ok)


@triton.jit
def _logits_t(q, s_ptr, g, c0, c_hi, qk_scale, stride_sh, stride_sc,
              D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(Logits of summaries c0 .. c0+BLOCK_C-1 against the rows, transposed [BLOCK_C, rows], their ids [BLOCK_C])."""
    s, offs_c = _load_summaries(s_ptr, g, c0, c_hi, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
    return tl.dot(s, tl.trans(q)) * qk_scale, offs_c


@triton.jit
def _store_columns(col_ptr, pt, offs_c, c_hi,
                   BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """Probabilities pt [BLOCK_C, rows] summed over the heads, maxed over the queries, stored per summary."""
    if HEAD_MAJOR:
        col = tl.max(tl.sum(tl.reshape(pt, [BLOCK_C, BLOCK_G, BLOCK_T]), axis=1), axis=1)  # [BLOCK_C]
    else:
        col = tl.max(tl.sum(tl.reshape(pt, [BLOCK_C, BLOCK_T, BLOCK_G]), axis=2), axis=1)
    tl.store(col_ptr + offs_c, col, mask=offs_c < c_hi)


@triton.jit
def _column_kernel(
    q_ptr, s_ptr, lse_ptr, col_ptr, start_ptr, T, max_splits, lse_splits, qk_scale,
    stride_qh, stride_qt, stride_sh, stride_sc, stride_lh, stride_lt, stride_ch, stride_ct,
    G: tl.constexpr, D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    LSE_BLOCK_C: tl.constexpr, HEAD_MAJOR: tl.constexpr, PDL: tl.constexpr,
):
    """Pass 2: per summary of one split, the probabilities summed over the group's heads, max over the t-block's
    queries that see it (invisible pairs count 0, never above a real probability). Summaries are the rows of the
    logits here, so both reductions run along the rows of the matrix-multiply result. The log-sum-exp merges the
    partials of pass 1's live splits (lse_splits, LSE_BLOCK_C: its split settings)."""
    pdl.enter(PDL)
    g, tb = tl.program_id(0), tl.program_id(1)
    q_start = tl.load(start_ptr)
    q, hl, t, row_ok = _load_queries(q_ptr, g, tb, T, stride_qh, stride_qt, G, D, BLOCK_G, BLOCK_T, BLOCK_D,
                                     HEAD_MAJOR)
    pos = q_start + t  # [rows]
    offs_s = tl.arange(0, BLOCK_S)
    parts = tl.load(lse_ptr + ((g * G + hl) * stride_lh + t * stride_lt)[:, None] + offs_s[None, :],
                    mask=row_ok[:, None] & (offs_s < lse_splits)[None, :], other=float("-inf"))  # [rows, BLOCK_S]
    _, n_lse = _splits(q_start, T, lse_splits, KERNEL, STRIDE, LSE_BLOCK_C)
    parts = tl.where((offs_s < n_lse)[None, :], parts, float("-inf"))  # masked after the load: it need not wait
    lse = _merge_lse(parts)  # [rows]
    lse = tl.where(row_ok, lse, float("inf"))  # padding rows: probability 0
    c_lo, c_mid, c_hi = _summary_range(q_start, T, tb, max_splits, KERNEL, STRIDE, BLOCK_T, BLOCK_C)
    col_ptr += g * stride_ch + tb * stride_ct
    for c0 in range(c_lo, c_mid, BLOCK_C):  # every query sees the whole chunk
        xt, offs_c = _logits_t(q, s_ptr, g, c0, c_hi, qk_scale, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
        _store_columns(col_ptr, tl.exp2(xt - lse[None, :]), offs_c, c_hi, BLOCK_G, BLOCK_T, BLOCK_C, HEAD_MAJOR)
    for c0 in range(c_mid, c_hi, BLOCK_C):
        xt, offs_c = _logits_t(q, s_ptr, g, c0, c_hi, qk_scale, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
        visible = offs_c[:, None] * STRIDE + KERNEL - 1 <= pos[None, :]
        _store_columns(col_ptr, tl.where(visible, tl.exp2(xt - lse[None, :]), 0.0), offs_c, c_hi,
                       BLOCK_G, BLOCK_T, BLOCK_C, HEAD_MAJOR)


@triton.jit
def _radix_step(bits, tau, n_ge, k_sel, shift, RADIX: tl.constexpr):
    """Decide the digit of tau at bits shift.. (tau, n_ge: the threshold so far and the keys >= it): the largest
    d < RADIX with at least k_sel keys >= tau + d << shift."""
    passed = tl.minimum(tl.maximum((bits - tau) >> shift, 0), RADIX - 1)  # candidates d = 1.. each key reaches
    hist = tl.histogram(passed, RADIX)  # [RADIX]
    at_least = tl.sum(hist) - tl.cumsum(hist, 0) + hist  # [RADIX]: keys >= tau + d << shift (d >= 1)
    d = tl.arange(0, RADIX)
    digit = tl.sum(((at_least >= k_sel) & (d >= 1)).to(tl.int32))
    n_ge = tl.where(digit > 0, tl.sum(tl.where(d == digit, at_least, 0)), n_ge)
    return tau + (digit << shift), n_ge


@triton.jit
def _top(bits, k_sel, RADIX_BITS: tl.constexpr):
    """The k_sel largest keys of bits [lanes] (>= 0 order as their bits; -1: no key), ties to the lowest lanes, or
    every key when fewer: (chosen [lanes], slot [lanes]: a chosen lane's place among the chosen in lane order,
    how many are chosen). A radix select finds a threshold tau RADIX_BITS bits a step from the top (bit 31 is 0 for
    every key; the last step overlaps bits already decided), stopping once no more than k_sel keys are >= it; after
    the last step it is the k_sel-th largest key. One scan ranks the chosen lanes."""
    tau = tl.full((), 0, tl.int32)
    n_ge = tl.sum((bits >= 0).to(tl.int32))  # keys >= tau
    shift = tl.full((), 31 - RADIX_BITS, tl.int32)
    while (n_ge > k_sel) & (shift > -RADIX_BITS):
        tau, n_ge = _radix_step(bits, tau, n_ge, k_sel, tl.maximum(shift, 0), 1 << RADIX_BITS)
        shift -= RADIX_BITS
    gt, eq = bits > tau, bits == tau
    n_eq = k_sel - tl.sum(gt.to(tl.int32))  # ties at tau: the lowest lanes first
    rank = tl.cumsum(gt.to(tl.int32) * 65536 + eq.to(tl.int32), axis=0)  # (gt so far) << 16 | (eq so far)
    chosen = gt | (eq & ((rank & 65535) <= n_eq))
    return chosen, (rank >> 16) + tl.minimum(rank & 65535, n_eq) - 1, tl.sum(chosen.to(tl.int32))


@triton.jit
def _store_selection(idx_ptr, cnt_ptr, blocks, chosen, slot, n_sel, MAX_SEL: tl.constexpr, BLOCK_SEL: tl.constexpr):
    """The chosen blocks at their slots of idx_ptr's row (ascending when the lanes are), -1 after them; the count."""
    tl.store(idx_ptr + slot, blocks, mask=chosen)
    j = tl.arange(0, BLOCK_SEL)
    tl.store(idx_ptr + j, tl.full([BLOCK_SEL], -1, tl.int32), mask=(j >= n_sel) & (j < MAX_SEL))
    tl.store(cnt_ptr, n_sel)


@triton.jit
def _last_to_finish(counter_ptr, n_programs):
    """Whether this program is the last of the n_programs sharing *counter_ptr to call this, after storing what
    the last one reads (as CUTLASS's split-K semaphore: one launch where a second would wait for the whole grid).
    A CTA barrier puts every thread's stores before one thread's acquire-release atomic at GPU scope, so the last
    program sees them all; it must read them with cache_modifier=".cg" (L2: an SM's L1 is not coherent). It sets
    the counter back to 0."""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == n_programs - 1
    tl.store(counter_ptr, 0, mask=last)
    return last


@triton.jit
def _chunk_blocks(chunk, BLOCK_NB: tl.constexpr, BLOCK_SIZE: tl.constexpr, KERNEL: tl.constexpr,
                  STRIDE: tl.constexpr):
    """The blocks of one chunk of pass 3 [BLOCK_NB] and, per block, the first and last summary overlapping it."""
    b = chunk * BLOCK_NB + tl.arange(0, BLOCK_NB)
    c_first = tl.maximum(b * BLOCK_SIZE - KERNEL + STRIDE, 0) // STRIDE
    c_last = ((b + 1) * BLOCK_SIZE - 1) // STRIDE
    return b, c_first, c_last


@triton.jit
def _keep_top(score, b, q_start, T, i, score_ptr, idx_ptr, cnt_ptr, cand_ptr, ticket_ptr, g, row, chunk,
              stride_sh, stride_st, stride_ih, stride_it, stride_nh,
              BLOCK_SIZE: tl.constexpr, Q_TILE: tl.constexpr, TOPK: tl.constexpr, INIT_BLOCKS: tl.constexpr,
              WINDOW: tl.constexpr, MAX_SEL: tl.constexpr, N_CHUNKS: tl.constexpr, BLOCK_SEL: tl.constexpr,
              RADIX_BITS: tl.constexpr, STORE_SCORES: tl.constexpr):
    """Pass 3's common tail for the block scores [BLOCK_NB] of tile i (output row `row`): optionally store them,
    force the sink and window blocks (+inf), keep the top max(topk, forced) (`_top`) and store them with their
    count; with N_CHUNKS > 1 store them as this chunk's candidates (keys and blocks, ascending, -1 padded), and the
    last chunk to finish (`_last_to_finish`) keeps the top of all candidates: exact, since each of the overall top
    ones is among its chunk's top ones."""
    if STORE_SCORES:
        tl.store(score_ptr + g * stride_sh + row * stride_st + b, score, mask=b * BLOCK_SIZE < q_start + T)
    p_lo = q_start + i * Q_TILE
    p_hi = q_start + tl.minimum(i * Q_TILE + Q_TILE, T) - 1
    forced = ((b < INIT_BLOCKS) | ((b + 1) * BLOCK_SIZE - 1 >= p_lo - WINDOW + 1)) & (b * BLOCK_SIZE <= p_hi)
    key = tl.where(forced, float("inf"), score)  # non-causal blocks have no score: -inf
    bits = tl.where(key > float("-inf"), key.to(tl.int32, bitcast=True), -1)  # keys >= 0 order as their bits
    chosen, slot, n_sel = _top(bits, tl.maximum(tl.sum(forced.to(tl.int32)), TOPK), RADIX_BITS)
    idx_ptr += g * stride_ih + row * stride_it
    cnt_ptr += g * stride_nh + row
    if N_CHUNKS == 1:
        _store_selection(idx_ptr, cnt_ptr, b, chosen, slot, n_sel, MAX_SEL, BLOCK_SEL)
    else:
        # candidates [2, N_CHUNKS, BLOCK_SEL] per (kv head, tile): keys, then blocks
        tile = g * tl.num_programs(1) + row
        cand_ptr += tile * 2 * N_CHUNKS * BLOCK_SEL
        j = tl.arange(0, BLOCK_SEL)
        tl.store(cand_ptr + chunk * BLOCK_SEL + j, tl.full([BLOCK_SEL], -1, tl.int32), mask=j >= n_sel)
        tl.store(cand_ptr + chunk * BLOCK_SEL + slot, bits, mask=chosen)
        tl.store(cand_ptr + (N_CHUNKS + chunk) * BLOCK_SEL + slot, b, mask=chosen)
        if _last_to_finish(ticket_ptr + tile, N_CHUNKS):
            lanes = tl.arange(0, N_CHUNKS * BLOCK_SEL)  # candidates in chunk order: ascending blocks
            cand_bits = tl.load(cand_ptr + lanes, cache_modifier=".cg")
            cand_blocks = tl.load(cand_ptr + N_CHUNKS * BLOCK_SEL + lanes, cache_modifier=".cg")
            n_forced = tl.sum((cand_bits == 0x7F800000).to(tl.int32))  # +inf: only forced blocks score it
            top, top_slot, n_top = _top(cand_bits, tl.maximum(n_forced, TOPK), RADIX_BITS)
            _store_selection(idx_ptr, cnt_ptr, cand_blocks, top, top_slot, n_top, MAX_SEL, BLOCK_SEL)


@triton.jit
def _select_from_logits_kernel(
    x_ptr, lse_ptr, score_ptr, idx_ptr, cnt_ptr, cand_ptr, ticket_ptr, start_ptr, T, lse_splits,
    stride_xh, stride_xt, stride_lh, stride_lt, stride_sh, stride_st, stride_ih, stride_it, stride_nh,
    G: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_SIZE: tl.constexpr, Q_TILE: tl.constexpr,
    TOPK: tl.constexpr, INIT_BLOCKS: tl.constexpr, WINDOW: tl.constexpr, MAX_SEL: tl.constexpr,
    N_OVERLAP: tl.constexpr, BLOCK_NB: tl.constexpr, N_CHUNKS: tl.constexpr, BLOCK_SEL: tl.constexpr,
    RADIX_BITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, LSE_BLOCK_C: tl.constexpr,
    STORE_SCORES: tl.constexpr, PER_QUERY: tl.constexpr, PDL: tl.constexpr,
):
    """Pass 3 of a decode-sized call (one tile), per (kv head, tile or query, chunk of BLOCK_NB blocks): the summary
    scores straight from pass 1's logits and log-sum-exp partials (no pass 2), maxed over each block's summaries
    and the queries, then `_keep_top`. PER_QUERY: axis 1 is the query, selecting as a call with T = 1 at its own
    start; its outputs go to row `row`."""
    pdl.enter(PDL)
    g, row, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    query, i = _query_and_block(PER_QUERY)  # i: the tile within the call
    q_start = tl.load(start_ptr + query)
    x_ptr += query * stride_xt
    lse_ptr += query * stride_lt
    b, c_first, c_last = _chunk_blocks(chunk, BLOCK_NB, BLOCK_SIZE, KERNEL, STRIDE)
    score = tl.full([BLOCK_NB], float("-inf"), tl.float32)
    hl = tl.arange(0, BLOCK_G)  # the group's heads
    offs_s = tl.arange(0, BLOCK_S)
    _, n_lse = _splits(q_start, T, lse_splits, KERNEL, STRIDE, LSE_BLOCK_C)
    for t in range(0, T):
        rows = (g * G + hl) * stride_lh + t * stride_lt  # [BLOCK_G]
        parts = tl.load(lse_ptr + rows[:, None] + offs_s[None, :],
                        mask=(hl < G)[:, None] & (offs_s < n_lse)[None, :], other=float("-inf"))
        lse = tl.where(hl < G, _merge_lse(parts), float("inf"))  # padding heads: probability 0
        x_rows = x_ptr + (g * G + hl) * stride_xh + t * stride_xt  # [BLOCK_G]
        n_vis = _n_visible(q_start + t, KERNEL, STRIDE)
        for j in tl.static_range(N_OVERLAP):
            c = c_first + j
            seen = (c <= c_last) & (c < n_vis)  # [BLOCK_NB]
            x = tl.load(x_rows[None, :] + c[:, None], mask=seen[:, None] & (hl < G)[None, :],
                        other=float("-inf"))  # [BLOCK_NB, BLOCK_G] logits, log2 domain
            prob = tl.sum(tl.exp2(x - lse[None, :]), axis=1)  # summed over the group's heads
            score = tl.maximum(score, tl.where(seen, prob, float("-inf")))
    _keep_top(score, b, q_start, T, i, score_ptr, idx_ptr, cnt_ptr, cand_ptr, ticket_ptr, g, row, chunk,
              stride_sh, stride_st, stride_ih, stride_it, stride_nh, BLOCK_SIZE, Q_TILE, TOPK, INIT_BLOCKS, WINDOW,
              MAX_SEL, N_CHUNKS, BLOCK_SEL, RADIX_BITS, STORE_SCORES)


@triton.jit
def _select_from_columns_kernel(
    col_ptr, score_ptr, idx_ptr, cnt_ptr, start_ptr, T,
    stride_ch, stride_ct, stride_sh, stride_st, stride_ih, stride_it, stride_nh,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_SIZE: tl.constexpr, Q_TILE: tl.constexpr,
    BLOCK_T: tl.constexpr, TB_PER_TILE: tl.constexpr, TOPK: tl.constexpr, INIT_BLOCKS: tl.constexpr,
    WINDOW: tl.constexpr, MAX_SEL: tl.constexpr, N_OVERLAP: tl.constexpr, BLOCK_NB: tl.constexpr,
    BLOCK_SEL: tl.constexpr, RADIX_BITS: tl.constexpr, STORE_SCORES: tl.constexpr, PDL: tl.constexpr,
):
    """Pass 3 of a prefill call, one program per (kv head, tile): pass 2's summary scores maxed over each block's
    summaries and the tile's t-blocks, then `_keep_top`."""
    pdl.enter(PDL)
    g, i = tl.program_id(0), tl.program_id(1)
    q_start = tl.load(start_ptr)
    b, c_first, c_last = _chunk_blocks(0, BLOCK_NB, BLOCK_SIZE, KERNEL, STRIDE)
    score = tl.full([BLOCK_NB], float("-inf"), tl.float32)
    for k in tl.static_range(TB_PER_TILE):
        tb = i * (Q_TILE // BLOCK_T) + k
        p_last = q_start + tl.minimum(tb * BLOCK_T + BLOCK_T, T) - 1
        n_vis = tl.where(tb * BLOCK_T < T, _n_visible(p_last, KERNEL, STRIDE), 0)
        for j in tl.static_range(N_OVERLAP):
            c = c_first + j
            v = tl.load(col_ptr + g * stride_ch + tb * stride_ct + c, mask=(c <= c_last) & (c < n_vis),
                        other=float("-inf"))
            score = tl.maximum(score, v)
    _keep_top(score, b, q_start, T, i, score_ptr, idx_ptr, cnt_ptr, idx_ptr, idx_ptr, g, i, 0,
              stride_sh, stride_st, stride_ih, stride_it, stride_nh, BLOCK_SIZE, Q_TILE, TOPK, INIT_BLOCKS, WINDOW,
              MAX_SEL, 1, BLOCK_SEL, RADIX_BITS, STORE_SCORES)


@dataclass(frozen=True)
class Tuning:
    """Launch settings of the GPU pipeline: rows (head, query pairs) per program, summaries per step, warps and
    pipeline stages of pass 1 (lse_*) and pass 2 (col_*); rows head-major (r = head*BLOCK_T + query) or
    query-major; bits per radix step, and blocks per program of pass 3 in decode; the programs pass 1 and 2 split
    the summaries for (decode). Measured on the H100 and H200: BENCHMARKS.md."""

    lse_rows: int = 128
    lse_block_c: int = 64
    lse_warps: int = 4
    col_rows: int = 128
    col_block_c: int = 64
    col_warps: int = 4
    num_stages: int = 3
    head_major: bool = True
    radix_bits: int = 4
    select_lanes: int = 512
    target_programs: int = 256


TUNING = Tuning()


def new_tickets(device: torch.device) -> torch.Tensor:
    """Zeroed int32 [TICKETS] counters for a chunked select (`_last_to_finish`), one per (kv head, tile). Each is 0
    again after every call, so one buffer serves the calls of one stream, one at a time: its owner (the KV cache,
    the benchmark) passes it to every call."""
    return torch.zeros(TICKETS, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class SelectPlan:
    """The sizes, grids and launch settings of a block_select call, computed once from its shape."""

    Hkv: int
    G: int
    d: int
    queries: int  # the rows of q; T: the queries of one call (1 with per_query)
    T: int
    per_query: bool
    C16: int  # scratch columns: the summaries, rounded up to 16 so that Triton compiles one kernel for any sizing
    n_blocks: int
    n_tiles: int  # rows of the outputs
    max_sel: int
    from_logits: bool  # a few queries: pass 1 stores its logits and pass 3 reads them (no pass 2)
    shape: dict  # the kernels' shared constexprs (G, D, KERNEL, STRIDE, BLOCK_G, BLOCK_D, HEAD_MAJOR)
    lse_block_t: int
    lse_splits: int
    lse_grid: tuple
    col_block_t: int
    col_splits: int
    col_grid: tuple
    block_s: int  # lanes holding pass 1's partials
    block_nb: int  # blocks per program of pass 3
    n_chunks: int
    block_sel: int


DECODE_LOGITS_MAX_T = 16  # up to this many queries pass 1 stores its logits and pass 3 reads them (no pass 2)
TICKETS = 4096  # (kv head, tile) pairs a chunked select may have


def plan(Hq: int, Hkv: int, d: int, queries: int, per_query: bool, L: int, kernel: int, stride: int,
         block_size: int, q_tile: int, topk: int, init_blocks: int, window: int, tuning: Tuning) -> SelectPlan:
    """The plan of a call with `queries` queries over L keys (the live count, or the capacity: see block_select)."""
    T = 1 if per_query else queries  # per_query: every size below is a one-query call's
    G = Hq // Hkv
    C, n_blocks = num_summaries(L, kernel, stride), triton.cdiv(L, block_size)
    BLOCK_G = triton.next_power_of_2(G)
    min_t = 16 // min(BLOCK_G, 16)  # tl.dot needs 16 rows
    max_splits = lambda programs: max(1, tuning.target_programs // programs)
    # pass 1: rows = BLOCK_G heads x lse_block_t queries; the summaries split when there are few rows (decode)
    lse_block_t = max(min(triton.next_power_of_2(T), tuning.lse_rows // BLOCK_G), min_t)
    lse_tb = triton.cdiv(T, lse_block_t)
    lse_splits = max_splits(Hkv * lse_tb)
    lse_grid = (Hkv, queries if per_query else lse_tb, min(lse_splits, triton.cdiv(max(C, 1), tuning.lse_block_c)))
    # pass 2: t-blocks inside one query tile; col [Hkv, col_tb, C]
    col_block_t = max(min(q_tile, triton.next_power_of_2(T), tuning.col_rows // BLOCK_G), min_t)
    col_tb = triton.cdiv(T, col_block_t)
    col_splits = max_splits(Hkv * col_tb)
    col_grid = (Hkv, col_tb, min(col_splits, triton.cdiv(max(C, 1), tuning.col_block_c)))
    # pass 3: one program per (kv head, tile or query, chunk of the blocks); chunks only from logits (one tile)
    from_logits = T <= DECODE_LOGITS_MAX_T
    max_sel = max_selected(topk, window, block_size, q_tile, init_blocks)
    lanes = max(16, triton.next_power_of_2(n_blocks))
    block_nb = min(lanes, tuning.select_lanes) if from_logits else lanes
    n_tiles = queries if per_query else triton.cdiv(T, q_tile)
    assert n_blocks < 65536 and (lanes == block_nb or Hkv * n_tiles <= TICKETS)
    return SelectPlan(
        Hkv=Hkv, G=G, d=d, queries=queries, T=T, per_query=per_query, C16=triton.cdiv(max(C, 1), 16) * 16,
        n_blocks=n_blocks, n_tiles=n_tiles, max_sel=max_sel, from_logits=from_logits,
        shape=dict(G=G, D=d, KERNEL=kernel, STRIDE=stride, BLOCK_G=BLOCK_G, BLOCK_D=max(16, triton.next_power_of_2(d)),
                   HEAD_MAJOR=tuning.head_major),
        lse_block_t=lse_block_t, lse_splits=lse_splits, lse_grid=lse_grid, col_block_t=col_block_t,
        col_splits=col_splits, col_grid=col_grid, block_s=max(2, triton.next_power_of_2(lse_splits)),
        block_nb=block_nb, n_chunks=lanes // block_nb, block_sel=triton.next_power_of_2(max_sel))


def _log_sum_exp_pass(p: SelectPlan, tuning: Tuning, q, summaries, start, qk_scale):
    """Pass 1: (lse [Hq, queries, lse_splits] partial log2-sum-exp2s, logits [Hq, queries, C16] when from_logits)."""
    dev = q.device
    logits = torch.empty((p.Hkv * p.G, p.queries, p.C16) if p.from_logits else (1, 1, 1), dtype=torch.float32,
                         device=dev)
    lse = torch.empty((p.Hkv * p.G, p.queries, p.lse_splits), dtype=torch.float32, device=dev)
    _lse_kernel[p.lse_grid](
        q, summaries, lse, logits, start, p.T, p.lse_splits, qk_scale, q.stride(0), q.stride(1), summaries.stride(0),
        summaries.stride(1), lse.stride(0), lse.stride(1), logits.stride(0), logits.stride(1), **p.shape,
        BLOCK_T=p.lse_block_t, BLOCK_C=tuning.lse_block_c, STORE_LOGITS=p.from_logits, PER_QUERY=p.per_query,
        num_warps=tuning.lse_warps, num_stages=tuning.num_stages, **pdl.launch(dev),
    )
    return lse, logits


def _column_pass(p: SelectPlan, tuning: Tuning, q, summaries, start, lse, qk_scale) -> torch.Tensor:
    """Pass 2: col [Hkv, t-blocks, C16], each summary's probability summed over the heads, maxed over the t-block."""
    col = torch.empty((p.Hkv, p.col_grid[1], p.C16), dtype=torch.float32, device=q.device)
    _column_kernel[p.col_grid](
        q, summaries, lse, col, start, p.T, p.col_splits, p.lse_splits, qk_scale, q.stride(0), q.stride(1),
        summaries.stride(0), summaries.stride(1), lse.stride(0), lse.stride(1), col.stride(0), col.stride(1),
        **p.shape, BLOCK_T=p.col_block_t, BLOCK_C=tuning.col_block_c, BLOCK_S=p.block_s,
        LSE_BLOCK_C=tuning.lse_block_c, num_warps=tuning.col_warps, num_stages=tuning.num_stages,
        **pdl.launch(q.device),
    )
    return col


def _select_pass(p: SelectPlan, tuning: Tuning, geometry: dict, start, lse, logits, col, scores, tickets):
    """Pass 3: (block_idx [Hkv, n_tiles, max_sel], block_count [Hkv, n_tiles])."""
    dev = lse.device
    block_idx = torch.empty((p.Hkv, p.n_tiles, p.max_sel), dtype=torch.int32, device=dev)
    block_count = torch.empty((p.Hkv, p.n_tiles), dtype=torch.int32, device=dev)
    out = block_idx if scores is None else scores  # the block scores, when asked for
    common = dict(BLOCK_SIZE=geometry["block_size"], Q_TILE=geometry["q_tile"], TOPK=geometry["topk"],
                  INIT_BLOCKS=geometry["init_blocks"], WINDOW=geometry["window"], MAX_SEL=p.max_sel,
                  N_OVERLAP=(geometry["block_size"] + geometry["kernel"] - 2) // geometry["stride"] + 1,
                  BLOCK_NB=p.block_nb, BLOCK_SEL=p.block_sel, RADIX_BITS=tuning.radix_bits,
                  STORE_SCORES=scores is not None, num_warps=min(8, max(4, p.block_nb // 256)), **pdl.launch(dev))
    strides = (out.stride(0), out.stride(1), block_idx.stride(0), block_idx.stride(1), block_count.stride(0))
    if p.from_logits:
        assert p.n_chunks == 1 or tickets is not None, "a chunked select needs the caller's tickets (new_tickets)"
        candidates = torch.empty((p.Hkv, p.n_tiles, 2, p.n_chunks, p.block_sel) if p.n_chunks > 1 else (1,),
                                 dtype=torch.int32, device=dev)  # keys, then blocks
        _select_from_logits_kernel[(p.Hkv, p.n_tiles, p.n_chunks)](
            logits, lse, out, block_idx, block_count, candidates, block_count if tickets is None else tickets,
            start, p.T, p.lse_splits, logits.stride(0), logits.stride(1), lse.stride(0), lse.stride(1), *strides,
            G=p.G, KERNEL=geometry["kernel"], STRIDE=geometry["stride"], N_CHUNKS=p.n_chunks, BLOCK_G=p.shape["BLOCK_G"],
            BLOCK_S=p.block_s, LSE_BLOCK_C=tuning.lse_block_c, PER_QUERY=p.per_query, **common,
        )
    else:
        _select_from_columns_kernel[(p.Hkv, p.n_tiles)](
            col, out, block_idx, block_count, start, p.T, col.stride(0), col.stride(1), *strides,
            KERNEL=geometry["kernel"], STRIDE=geometry["stride"], BLOCK_T=p.col_block_t,
            TB_PER_TILE=min(geometry["q_tile"] // p.col_block_t, p.col_grid[1]), **common,
        )
    return block_idx, block_count


def block_select(
    q: torch.Tensor, summaries: torch.Tensor, q_start: int | torch.Tensor,
    kernel: int = 32, stride: int = 16, block_size: int = 64, q_tile: int = 64,
    topk: int = 64, init_blocks: int = 1, window: int = 2048, sm_scale: float | None = None,
    scores: torch.Tensor | None = None, max_len: int | None = None, per_query: bool = False,
    tickets: torch.Tensor | None = None, tuning: Tuning = TUNING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `reference`: q [Hq, T, d], summaries [Hkv, max_summaries, d] ->
    (block_idx [Hkv, n_tiles, max_sel], block_count [Hkv, n_tiles]), two or three launches (module doc), no host
    sync.

    q_start: int, or int32 [1] tensor on q's device for decode-sized calls (one tile); the kernels read it from the
    device either way. An int sizes the grids and scratch to the live keys L = q_start + T. A tensor's value is
    never read on the host (CUDA-graph friendly): they are sized to the capacity L_cap = min(max_len,
    max_summaries * stride + kernel - 1) (the most keys whose windows fit in summaries), and the caller
    guarantees q_start + T <= L_cap. Both give the same bits. Pass max_len (the KV cache's length) with a tensor:
    131072 keys have 8191 summaries, which alone allow 131087 keys (2049 blocks: twice the select's work).
    When given, scores [Hkv, n_tiles, cdiv(L or L_cap, block_size)] fp32 receives reference_scores' block scores
    in its first cdiv(L, block_size) columns. tickets: new_tickets' buffer, needed when a decode-sized call spans
    more than tuning.select_lanes blocks.

    per_query (speculative verification): q_start is a device int32 [T] tensor of each query's position, and each
    query selects alone, with the bits of a call for it alone (q[:, i:i+1] at q_start[i:i+1]): outputs
    [Hkv, T, max_sel] and [Hkv, T], in the same two launches as one query."""
    Hq, queries, d = q.shape
    Hkv = summaries.shape[0]
    assert Hq % Hkv == 0 and summaries.shape[2] == d and q.dtype == summaries.dtype
    assert q.stride(-1) == 1 and summaries.stride(-1) == 1
    assert q_tile >= 16 and q_tile & (q_tile - 1) == 0, "q_tile must be a power of two >= 16"
    L_cap = summaries.shape[1] * stride + kernel - 1
    L_cap = L_cap if max_len is None else min(L_cap, max_len)
    if isinstance(q_start, int):
        assert not per_query, "per_query reads each query's start from a device tensor"
        assert q_start + queries <= L_cap
        L, start = q_start + queries, torch.full((1,), q_start, dtype=torch.int32, device=q.device)
    else:
        assert queries <= MAX_QUERIES and (per_query or queries <= q_tile), "a device q_start is for one decode tile"
        assert q_start.shape == (queries if per_query else 1,), "per_query: one start per query, else one"
        assert q_start.dtype == torch.int32 and q_start.device == q.device
        L, start = L_cap, q_start
    geometry = dict(kernel=kernel, stride=stride, block_size=block_size, q_tile=q_tile, topk=topk,
                    init_blocks=init_blocks, window=window)
    p = plan(Hq, Hkv, d, queries, per_query, L, **geometry, tuning=tuning)
    if scores is not None:
        assert scores.shape == (Hkv, p.n_tiles, p.n_blocks) and scores.dtype == torch.float32 and scores.stride(2) == 1
    qk_scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * 1.4426950408889634  # log2 domain
    lse, logits = _log_sum_exp_pass(p, tuning, q, summaries, start, qk_scale)
    col = None if p.from_logits else _column_pass(p, tuning, q, summaries, start, lse, qk_scale)
    return _select_pass(p, tuning, geometry, start, lse, logits, col, scores, tickets)


def block_scores(
    q: torch.Tensor, summaries: torch.Tensor, q_start: int,
    kernel: int = 32, stride: int = 16, block_size: int = 64, q_tile: int = 64, sm_scale: float | None = None,
    tuning: Tuning = TUNING,
) -> torch.Tensor:
    """Triton version of reference_scores (the block scores block_select ranks): [Hkv, n_tiles, n_blocks] fp32."""
    T, L = q.shape[1], q_start + q.shape[1]
    scores = torch.empty((summaries.shape[0], triton.cdiv(T, q_tile), triton.cdiv(L, block_size)),
                         dtype=torch.float32, device=q.device)
    block_select(q, summaries, q_start, kernel, stride, block_size, q_tile, sm_scale=sm_scale, scores=scores,
                 tickets=new_tickets(q.device), tuning=tuning)
    return scores


def select_blocks(
    scores: torch.Tensor, q_start: int, T: int,
    block_size: int = 64, q_tile: int = 64, topk: int = 64, init_blocks: int = 1, window: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forced blocks + top-k over scores [Hkv, n_tiles, n_blocks] -> (block_idx, block_count), see module doc."""
    Hkv, n_tiles, n_blocks = scores.shape
    dev = scores.device
    max_sel = max_selected(topk, window, block_size, q_tile, init_blocks)
    t_lo = torch.arange(n_tiles, device=dev) * q_tile
    p_lo = q_start + t_lo  # [n_tiles]
    p_hi = q_start + torch.clamp(t_lo + q_tile, max=T) - 1  # [n_tiles]
    b = torch.arange(n_blocks, device=dev)  # [n_blocks]
    causal = b[None, :] * block_size <= p_hi[:, None]  # [n_tiles, n_blocks]
    local = (b[None, :] + 1) * block_size - 1 >= (p_lo - window + 1)[:, None]
    forced = ((b < init_blocks)[None, :] | local) & causal  # [n_tiles, n_blocks]
    scores = scores.masked_fill(forced, math.inf)  # unscored (-inf) blocks include all non-causal ones
    k = min(max_sel, n_blocks)
    vals, idx = scores.topk(k, dim=-1)  # [Hkv, n_tiles, k], forced first
    n_keep = torch.clamp(forced.sum(-1), min=topk)  # [n_tiles]
    keep = (torch.arange(k, device=dev) < n_keep[:, None]) & (vals > -math.inf)  # [Hkv, n_tiles, k]
    idx = torch.where(keep, idx, n_blocks).sort(-1).values
    block_idx = torch.full((Hkv, n_tiles, max_sel), -1, dtype=torch.int32, device=dev)
    block_idx[..., :k] = torch.where(idx == n_blocks, -1, idx).to(torch.int32)
    return block_idx, keep.sum(-1, dtype=torch.int32)

