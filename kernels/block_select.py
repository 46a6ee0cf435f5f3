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

GPU (block_select), three launches and no host sync: pass 1 computes each (head, query) row's log-sum-exp over
its visible summaries (split over programs when there are few rows, as in decode); pass 2 recomputes the logits
and writes, per (kv head, t-block of queries, summary), the probabilities summed over the group's heads and maxed
over the queries; pass 3, one program per (kv head, tile), max-pools those to blocks, forces the sink and window
blocks (+inf) and keeps the top ones by a radix select on the float bits (ties: lowest block first). On CPU the
engine uses reference_scores and select_blocks, the same selection in plain torch.
"""

import math

import torch
import triton
import triton.language as tl

from infer.kernels.pool_keys import num_summaries

_TARGET_PROGRAMS = 256  # split the summaries over programs until about this many run (decode)


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


# Tuning of the GPU pipeline (H100): rows (head, query pairs) per program of pass 1 / pass 2, summaries per step,
# warps and pipeline stages of each pass.
TUNING = dict(lse_rows=128, lse_warps=4, col_rows=256, col_warps=8, block_c=64, num_stages=2)


@triton.jit
def _n_visible(p, C, KERNEL: tl.constexpr, STRIDE: tl.constexpr):
    """How many summaries (of the C written) the query at position p sees: c*STRIDE + KERNEL - 1 <= p."""
    return tl.minimum(C, tl.maximum(p + 1 - KERNEL + STRIDE, 0) // STRIDE)


@triton.jit
def _summary_range(q_start, T, C, tb, split, c_per_split,
                   KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Summaries [c_lo, c_hi) of this split that the last query of t-block tb sees; [c_lo, c_mid) are whole
    BLOCK_C chunks that every query of the t-block sees (no masking needed)."""
    p_first = q_start + tb * BLOCK_T
    p_last = q_start + tl.minimum(tb * BLOCK_T + BLOCK_T, T) - 1
    c_lo = split * c_per_split
    c_hi = tl.minimum(c_lo + c_per_split, _n_visible(p_last, C, KERNEL, STRIDE))
    c_all = tl.minimum(c_hi, _n_visible(p_first, C, KERNEL, STRIDE))
    return c_lo, c_lo + tl.maximum(c_all - c_lo, 0) // BLOCK_C * BLOCK_C, c_hi


@triton.jit
def _load_queries(q_ptr, g, tb, T, stride_qh, stride_qt,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Queries of kv head g's heads in t-block tb as rows r = hl*BLOCK_T + t_local:
    (q [BLOCK_G*BLOCK_T, BLOCK_D], head in group hl, query t, row valid), each [BLOCK_G*BLOCK_T]."""
    offs_r = tl.arange(0, BLOCK_G * BLOCK_T)
    hl = offs_r // BLOCK_T
    t = tb * BLOCK_T + offs_r % BLOCK_T
    row_ok = (hl < G) & (t < T)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + (g * G + hl)[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    return q, hl, t, row_ok


@triton.jit
def _logits(q, s_ptr, g, c0, c_hi, qk_scale, stride_sh, stride_sc,
            D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(log2-domain logits of q against summaries c0 .. c0+BLOCK_C-1 of kv head g [rows, BLOCK_C], their ids)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    s = tl.load(s_ptr + g * stride_sh + offs_c[:, None] * stride_sc + offs_d[None, :],
                mask=(offs_c < c_hi)[:, None] & (offs_d < D)[None, :], other=0.0)  # [BLOCK_C, BLOCK_D]
    return tl.dot(q, tl.trans(s)) * qk_scale, offs_c


@triton.jit
def _online_lse(m, l, x):
    """Fold logits x [rows, BLOCK_C] into the running max m and sum l (log2 domain) of each row."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    return m_new, l * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)


@triton.jit
def _lse_kernel(
    q_ptr, s_ptr, lse_ptr, q_start, T, C, c_per_split, qk_scale,
    stride_qh, stride_qt, stride_sh, stride_sc, stride_lh, stride_lt,
    G: tl.constexpr, D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 1: log2-sum-exp2 of each (head, query) row over the visible summaries of one split."""
    g, tb, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q, hl, t, row_ok = _load_queries(q_ptr, g, tb, T, stride_qh, stride_qt, G, D, BLOCK_G, BLOCK_T, BLOCK_D)
    pos = q_start + t  # [rows]
    c_lo, c_mid, c_hi = _summary_range(q_start, T, C, tb, split, c_per_split, KERNEL, STRIDE, BLOCK_T, BLOCK_C)
    m = tl.full([BLOCK_G * BLOCK_T], -1e30, tl.float32)  # finite, so fully masked chunks give exp2(-inf) = 0
    l = tl.zeros([BLOCK_G * BLOCK_T], tl.float32)
    for c0 in range(c_lo, c_mid, BLOCK_C):  # every query sees the whole chunk
        x, _ = _logits(q, s_ptr, g, c0, c_hi, qk_scale, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
        m, l = _online_lse(m, l, x)
    for c0 in range(c_mid, c_hi, BLOCK_C):
        x, offs_c = _logits(q, s_ptr, g, c0, c_hi, qk_scale, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
        visible = (offs_c[None, :] * STRIDE + KERNEL - 1 <= pos[:, None]) & (offs_c < c_hi)[None, :]
        m, l = _online_lse(m, l, tl.where(visible, x, float("-inf")))
    lse = tl.where(l > 0, m + tl.log2(tl.maximum(l, 1.0)), float("-inf"))  # l >= 1 once a summary is visible
    tl.store(lse_ptr + (g * G + hl) * stride_lh + t * stride_lt + split, lse, mask=row_ok)


@triton.jit
def _store_columns(col_ptr, p, offs_c, c_hi, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Probabilities p [BLOCK_G*BLOCK_T, BLOCK_C] summed over the heads, maxed over the queries, stored."""
    col = tl.max(tl.sum(tl.reshape(p, [BLOCK_G, BLOCK_T, BLOCK_C]), axis=0), axis=0)  # [BLOCK_C]
    tl.store(col_ptr + offs_c, col, mask=offs_c < c_hi)


@triton.jit
def _column_kernel(
    q_ptr, s_ptr, lse_ptr, col_ptr, q_start, T, C, c_per_split, n_lse, qk_scale,
    stride_qh, stride_qt, stride_sh, stride_sc, stride_lh, stride_lt, stride_ch, stride_ct,
    G: tl.constexpr, D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Pass 2: per summary of one split, the probabilities summed over the group's heads, max over the t-block's
    queries that see it (invisible pairs count 0, never above a real probability)."""
    g, tb, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q, hl, t, row_ok = _load_queries(q_ptr, g, tb, T, stride_qh, stride_qt, G, D, BLOCK_G, BLOCK_T, BLOCK_D)
    pos = q_start + t  # [rows]
    offs_s = tl.arange(0, BLOCK_S)
    parts = tl.load(lse_ptr + ((g * G + hl) * stride_lh + t * stride_lt)[:, None] + offs_s[None, :],
                    mask=row_ok[:, None] & (offs_s < n_lse)[None, :], other=float("-inf"))  # [rows, BLOCK_S]
    m = tl.max(parts, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    lse = m + tl.log2(tl.sum(tl.exp2(parts - m[:, None]), axis=1))  # [rows], -inf: nothing visible
    lse = tl.where(row_ok, lse, float("inf"))  # padding rows: probability 0
    c_lo, c_mid, c_hi = _summary_range(q_start, T, C, tb, split, c_per_split, KERNEL, STRIDE, BLOCK_T, BLOCK_C)
    col_ptr += g * stride_ch + tb * stride_ct
    for c0 in range(c_lo, c_mid, BLOCK_C):  # every query sees the whole chunk
        x, offs_c = _logits(q, s_ptr, g, c0, c_hi, qk_scale, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
        _store_columns(col_ptr, tl.exp2(x - lse[:, None]), offs_c, c_hi, BLOCK_G, BLOCK_T, BLOCK_C)
    for c0 in range(c_mid, c_hi, BLOCK_C):
        x, offs_c = _logits(q, s_ptr, g, c0, c_hi, qk_scale, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
        visible = offs_c[None, :] * STRIDE + KERNEL - 1 <= pos[:, None]
        _store_columns(col_ptr, tl.where(visible, tl.exp2(x - lse[:, None]), 0.0), offs_c, c_hi, BLOCK_G, BLOCK_T,
                       BLOCK_C)


@triton.jit
def _select_kernel(
    col_ptr, score_ptr, idx_ptr, cnt_ptr, q_start, T, C, n_blocks,
    stride_ch, stride_ct, stride_sh, stride_st, stride_ih, stride_it, stride_nh,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_SIZE: tl.constexpr, Q_TILE: tl.constexpr,
    BLOCK_T: tl.constexpr, TOPK: tl.constexpr, INIT_BLOCKS: tl.constexpr, WINDOW: tl.constexpr,
    MAX_SEL: tl.constexpr, N_OVERLAP: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_SEL: tl.constexpr,
    STORE_SCORES: tl.constexpr,
):
    """Pass 3, per (kv head, query tile): block scores (max over the overlapping summaries and the tile's
    t-blocks), forced blocks set to +inf, the top max(topk, forced) kept by a radix select over the float bits."""
    g, i = tl.program_id(0), tl.program_id(1)
    b = tl.arange(0, BLOCK_NB)
    c_first = tl.maximum(b * BLOCK_SIZE - KERNEL + STRIDE, 0) // STRIDE  # first summary overlapping block b
    c_last = ((b + 1) * BLOCK_SIZE - 1) // STRIDE
    score = tl.full([BLOCK_NB], float("-inf"), tl.float32)
    for k in tl.static_range(Q_TILE // BLOCK_T):
        tb = i * (Q_TILE // BLOCK_T) + k
        p_last = q_start + tl.minimum(tb * BLOCK_T + BLOCK_T, T) - 1
        n_vis = tl.where(tb * BLOCK_T < T, _n_visible(p_last, C, KERNEL, STRIDE), 0)
        for j in tl.static_range(N_OVERLAP):
            c = c_first + j
            v = tl.load(col_ptr + g * stride_ch + tb * stride_ct + c, mask=(c <= c_last) & (c < n_vis),
                        other=float("-inf"))
            score = tl.maximum(score, v)
    if STORE_SCORES:
        tl.store(score_ptr + g * stride_sh + i * stride_st + b, score, mask=b < n_blocks)
    p_lo = q_start + i * Q_TILE
    p_hi = q_start + tl.minimum(i * Q_TILE + Q_TILE, T) - 1
    forced = ((b < INIT_BLOCKS) | ((b + 1) * BLOCK_SIZE - 1 >= p_lo - WINDOW + 1)) & (b * BLOCK_SIZE <= p_hi)
    key = tl.where(forced, float("inf"), score)  # non-causal blocks have no score: -inf
    bits = tl.where(key > float("-inf"), key.to(tl.int32, bitcast=True), -1)  # keys >= 0: bits order as floats
    k_sel = tl.maximum(tl.sum(forced.to(tl.int32)), TOPK)
    tau = 0  # becomes the k_sel-th largest bits (0 when fewer are valid)
    for j in tl.static_range(31):
        cand = tau | (1 << (30 - j))
        tau = tl.where(tl.sum((bits >= cand).to(tl.int32)) >= k_sel, cand, tau)
    eq = bits == tau
    n_eq = k_sel - tl.sum((bits > tau).to(tl.int32))  # ties at tau: the lowest blocks first
    sel = (bits > tau) | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= n_eq))
    n_sel = tl.sum(sel.to(tl.int32))
    idx_ptr += g * stride_ih + i * stride_it
    tl.store(idx_ptr + tl.cumsum(sel.to(tl.int32), axis=0) - 1, b, mask=sel)  # ascending
    j = tl.arange(0, BLOCK_SEL)
    tl.store(idx_ptr + j, tl.full([BLOCK_SEL], -1, tl.int32), mask=(j >= n_sel) & (j < MAX_SEL))
    tl.store(cnt_ptr + g * stride_nh + i, n_sel)


def _split(C: int, block_c: int, programs: int) -> tuple[int, int]:
    """(summaries per split, n_split): split the C summaries until about _TARGET_PROGRAMS programs run."""
    n_chunks = triton.cdiv(C, block_c)
    chunks_per_split = triton.cdiv(n_chunks, max(1, min(n_chunks, _TARGET_PROGRAMS // programs)))
    return chunks_per_split * block_c, triton.cdiv(n_chunks, chunks_per_split)


def block_select(
    q: torch.Tensor, summaries: torch.Tensor, q_start: int,
    kernel: int = 32, stride: int = 16, block_size: int = 64, q_tile: int = 64,
    topk: int = 64, init_blocks: int = 1, window: int = 2048, sm_scale: float | None = None,
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `reference`: q [Hq, T, d], summaries [Hkv, max_summaries, d] ->
    (block_idx [Hkv, n_tiles, max_sel], block_count [Hkv, n_tiles]), three launches, no host sync.
    When given, scores [Hkv, n_tiles, n_blocks] fp32 receives reference_scores' block scores."""
    Hq, T, d = q.shape
    Hkv = summaries.shape[0]
    G = Hq // Hkv
    assert Hq == G * Hkv and summaries.shape[2] == d and q.dtype == summaries.dtype
    assert q.stride(-1) == 1 and summaries.stride(-1) == 1
    assert q_tile >= 16 and q_tile & (q_tile - 1) == 0, "q_tile must be a power of two >= 16"
    L = q_start + T
    C = num_summaries(L, kernel, stride)
    assert C <= summaries.shape[1]
    n_tiles, n_blocks = triton.cdiv(T, q_tile), triton.cdiv(L, block_size)
    dev = q.device
    qk_scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * 1.4426950408889634  # log2 domain
    cfg = TUNING
    BLOCK_C, BLOCK_G, BLOCK_D = cfg["block_c"], triton.next_power_of_2(G), max(16, triton.next_power_of_2(d))
    strides = (q.stride(0), q.stride(1), summaries.stride(0), summaries.stride(1))
    min_t = 16 // min(BLOCK_G, 16)  # tl.dot needs 16 rows
    # Pass 1: rows = BLOCK_G heads x BLOCK_T queries; split the summaries when there are few rows (decode).
    BLOCK_T = max(min(triton.next_power_of_2(T), cfg["lse_rows"] // BLOCK_G), min_t)
    n_tb = triton.cdiv(T, BLOCK_T)
    c_per_split, n_lse = _split(max(C, 1), BLOCK_C, Hkv * n_tb)
    lse = torch.empty((Hq, T, n_lse), dtype=torch.float32, device=dev)  # [Hq, T, n_lse] partial, log2 domain
    _lse_kernel[(Hkv, n_tb, n_lse)](
        q, summaries, lse, q_start, T, C, c_per_split, qk_scale, *strides, lse.stride(0), lse.stride(1),
        G=G, D=d, KERNEL=kernel, STRIDE=stride, BLOCK_G=BLOCK_G, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D,
        num_warps=cfg["lse_warps"], num_stages=cfg["num_stages"],
    )
    # Pass 2: t-blocks inside one query tile; col [Hkv, n_tb, C], written where seen by the t-block's last query.
    BLOCK_T = max(min(q_tile, triton.next_power_of_2(T), cfg["col_rows"] // BLOCK_G), min_t)
    n_tb = triton.cdiv(T, BLOCK_T)
    c_per_split, n_split = _split(max(C, 1), BLOCK_C, Hkv * n_tb)
    col = torch.empty((Hkv, n_tb, max(C, 1)), dtype=torch.float32, device=dev)
    _column_kernel[(Hkv, n_tb, n_split)](
        q, summaries, lse, col, q_start, T, C, c_per_split, n_lse, qk_scale, *strides, lse.stride(0), lse.stride(1),
        col.stride(0), col.stride(1),
        G=G, D=d, KERNEL=kernel, STRIDE=stride, BLOCK_G=BLOCK_G, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D,
        BLOCK_S=max(2, triton.next_power_of_2(n_lse)), num_warps=cfg["col_warps"], num_stages=cfg["num_stages"],
    )
    # Pass 3: one program per (kv head, tile).
    max_sel = max_selected(topk, window, block_size, q_tile, init_blocks)
    block_idx = torch.empty((Hkv, n_tiles, max_sel), dtype=torch.int32, device=dev)
    block_count = torch.empty((Hkv, n_tiles), dtype=torch.int32, device=dev)
    if scores is not None:
        assert scores.shape == (Hkv, n_tiles, n_blocks) and scores.dtype == torch.float32 and scores.stride(2) == 1
    out = col if scores is None else scores
    BLOCK_NB = max(16, triton.next_power_of_2(n_blocks))
    _select_kernel[(Hkv, n_tiles)](
        col, out, block_idx, block_count, q_start, T, C, n_blocks,
        col.stride(0), col.stride(1), out.stride(0), out.stride(1), block_idx.stride(0), block_idx.stride(1),
        block_count.stride(0),
        KERNEL=kernel, STRIDE=stride, BLOCK_SIZE=block_size, Q_TILE=q_tile, BLOCK_T=BLOCK_T, TOPK=topk,
        INIT_BLOCKS=init_blocks, WINDOW=window, MAX_SEL=max_sel, N_OVERLAP=(block_size + kernel - 2) // stride + 1,
        BLOCK_NB=BLOCK_NB, BLOCK_SEL=triton.next_power_of_2(max_sel), STORE_SCORES=scores is not None,
        num_warps=min(16, max(4, BLOCK_NB // 512)),
    )
    return block_idx, block_count


def block_scores(
    q: torch.Tensor, summaries: torch.Tensor, q_start: int,
    kernel: int = 32, stride: int = 16, block_size: int = 64, q_tile: int = 64, sm_scale: float | None = None,
) -> torch.Tensor:
    """Triton version of reference_scores (the block scores block_select ranks): [Hkv, n_tiles, n_blocks] fp32."""
    T, L = q.shape[1], q_start + q.shape[1]
    scores = torch.empty((summaries.shape[0], triton.cdiv(T, q_tile), triton.cdiv(L, block_size)),
                         dtype=torch.float32, device=q.device)
    block_select(q, summaries, q_start, kernel, stride, block_size, q_tile, sm_scale=sm_scale, scores=scores)
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

