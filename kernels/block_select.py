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


@triton.jit
def _summary_range(q_start, T, C, tb, split, c_per_split,
                   KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Summaries [c_lo, c_hi) of this split that the last query of the t-block can see."""
    p_hi = q_start + tl.minimum(tb * BLOCK_T + BLOCK_T, T) - 1
    n_vis = tl.minimum(C, tl.maximum(p_hi + 1 - KERNEL + STRIDE, 0) // STRIDE)
    c_lo = split * c_per_split
    return c_lo, tl.minimum(c_lo + c_per_split, n_vis)


@triton.jit
def _load_summaries(s_ptr, g, c0, c_hi, stride_sh, stride_sc,
                    D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(summaries c0 .. c0+BLOCK_C-1 of kv head g [BLOCK_C, BLOCK_D], their ids [BLOCK_C])."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = s_ptr + g * stride_sh + offs_c[:, None] * stride_sc + offs_d[None, :]
    return tl.load(ptrs, mask=(offs_c < c_hi)[:, None] & (offs_d < D)[None, :], other=0.0), offs_c


@triton.jit
def _lse_kernel(
    q_ptr, s_ptr, lse_ptr, q_start, T, C, c_per_split, sm_scale,
    stride_qh, stride_qt, stride_sh, stride_sc, stride_lh, stride_lt,
    G: tl.constexpr, D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 1: log-sum-exp of each (head, query) row over the visible summaries of one split.

    Rows r = (head hl of the group, query t) flattened as hl*BLOCK_T + t share each loaded summary chunk.
    """
    g, tb, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_G * BLOCK_T)
    hl = offs_r // BLOCK_T
    t = tb * BLOCK_T + offs_r % BLOCK_T
    row_ok = (hl < G) & (t < T)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = q_ptr + (g * G + hl)[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)  # [M, BLOCK_D]
    pos = q_start + t  # [M]
    c_lo, c_hi = _summary_range(q_start, T, C, tb, split, c_per_split, KERNEL, STRIDE, BLOCK_T)
    m = tl.full([BLOCK_G * BLOCK_T], -1e30, tl.float32)  # finite, so fully masked chunks give exp(-inf) = 0
    l = tl.zeros([BLOCK_G * BLOCK_T], tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        s, offs_c = _load_summaries(s_ptr, g, c0, c_hi, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
        visible = (offs_c[None, :] * STRIDE + KERNEL - 1 <= pos[:, None]) & (offs_c < c_hi)[None, :]
        logits = tl.where(visible, tl.dot(q, tl.trans(s)) * sm_scale, float("-inf"))  # [M, BLOCK_C]
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
    lse = tl.where(l > 0, m + tl.log(tl.maximum(l, 1.0)), float("-inf"))  # l >= 1 once a summary is visible
    tl.store(lse_ptr + (g * G + hl) * stride_lh + t * stride_lt + split, lse, mask=row_ok)


@triton.jit
def _block_score_kernel(
    q_ptr, s_ptr, lse_ptr, out_ptr, q_start, T, C, c_per_split, sm_scale,
    stride_qh, stride_qt, stride_sh, stride_sc, stride_lh, stride_lt, stride_oh, stride_ot,
    G: tl.constexpr, D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, Q_TILE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """Pass 2: probabilities summed over the group's heads, max-pooled to blocks and over the tile's queries."""
    g, tb, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T], all in one query tile
    pos = q_start + t
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (t < T)[:, None] & (offs_d < D)[None, :]
    c_lo, c_hi = _summary_range(q_start, T, C, tb, split, c_per_split, KERNEL, STRIDE, BLOCK_T)
    out = out_ptr + g * stride_oh + (tb * BLOCK_T // Q_TILE) * stride_ot
    for c0 in range(c_lo, c_hi, BLOCK_C):
        s, offs_c = _load_summaries(s_ptr, g, c0, c_hi, stride_sh, stride_sc, D, BLOCK_C, BLOCK_D)
        visible = (offs_c[None, :] * STRIDE + KERNEL - 1 <= pos[:, None]) & (t < T)[:, None] & (offs_c < c_hi)[None, :]
        p = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        for hl in range(G):
            h = g * G + hl
            q = tl.load(q_ptr + h * stride_qh + t[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + h * stride_lh + t * stride_lt, mask=t < T, other=0.0)  # [BLOCK_T]
            p += tl.where(visible, tl.exp(tl.dot(q, tl.trans(s)) * sm_scale - lse[:, None]), 0.0)
        col = tl.max(tl.where(visible, p, float("-inf")), axis=0)  # [BLOCK_C]
        b = (c0 * STRIDE) // BLOCK_SIZE + tl.arange(0, BLOCK_NB)  # blocks this chunk's windows can touch
        overlap = (offs_c[None, :] * STRIDE < (b[:, None] + 1) * BLOCK_SIZE) & (
            offs_c[None, :] * STRIDE + KERNEL > b[:, None] * BLOCK_SIZE
        )  # [BLOCK_NB, BLOCK_C]
        best = tl.max(tl.where(overlap, col[None, :], float("-inf")), axis=1)  # [BLOCK_NB]
        tl.atomic_max(out + b, best, mask=best > float("-inf"))


def _split(C: int, block_c: int, programs: int) -> tuple[int, int]:
    """(summaries per split, n_split): split the C summaries until about _TARGET_PROGRAMS programs run."""
    n_chunks = triton.cdiv(C, block_c)
    chunks_per_split = triton.cdiv(n_chunks, max(1, min(n_chunks, _TARGET_PROGRAMS // programs)))
    return chunks_per_split * block_c, triton.cdiv(n_chunks, chunks_per_split)


def block_scores(
    q: torch.Tensor, summaries: torch.Tensor, q_start: int,
    kernel: int = 32, stride: int = 16, block_size: int = 64, q_tile: int = 64, sm_scale: float | None = None,
) -> torch.Tensor:
    """Triton version of reference_scores: [Hkv, n_tiles, n_blocks] fp32, -inf = no score."""
    Hq, T, d = q.shape
    Hkv = summaries.shape[0]
    G = Hq // Hkv
    assert Hq == G * Hkv and summaries.shape[2] == d and q.dtype == summaries.dtype
    assert q.stride(-1) == 1 and summaries.stride(-1) == 1
    assert q_tile >= 16 and q_tile & (q_tile - 1) == 0, "q_tile must be a power of two >= 16"
    L = q_start + T
    C = num_summaries(L, kernel, stride)
    assert C <= summaries.shape[1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    n_tiles = triton.cdiv(T, q_tile)
    out = torch.full((Hkv, n_tiles, triton.cdiv(L, block_size)), -math.inf, dtype=torch.float32, device=q.device)
    if C == 0:
        return out
    BLOCK_C = 64
    BLOCK_D = max(16, triton.next_power_of_2(d))
    strides = (q.stride(0), q.stride(1), summaries.stride(0), summaries.stride(1))
    # Pass 1: rows = BLOCK_G heads x BLOCK_T queries, about 128 (at least 16 for tl.dot).
    BLOCK_G = triton.next_power_of_2(G)
    BLOCK_T = max(min(triton.next_power_of_2(T), max(1, 128 // BLOCK_G)), 16 // min(BLOCK_G, 16))
    n_tb = triton.cdiv(T, BLOCK_T)
    c_per_split, n_split = _split(C, BLOCK_C, Hkv * n_tb)
    lse = torch.empty((Hq, T, n_split), dtype=torch.float32, device=q.device)
    _lse_kernel[(Hkv, n_tb, n_split)](
        q, summaries, lse, q_start, T, C, c_per_split, sm_scale, *strides, lse.stride(0), lse.stride(1),
        G=G, D=d, KERNEL=kernel, STRIDE=stride, BLOCK_G=BLOCK_G, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D,
    )
    lse = torch.logsumexp(lse, -1)  # [Hq, T]
    # Pass 2: rows = BLOCK_T queries of one tile, a loop over the G heads.
    BLOCK_T = max(16, min(q_tile, triton.next_power_of_2(T), 64))
    n_tb = triton.cdiv(T, BLOCK_T)
    c_per_split, n_split = _split(C, BLOCK_C, Hkv * n_tb)
    _block_score_kernel[(Hkv, n_tb, n_split)](
        q, summaries, lse, out, q_start, T, C, c_per_split, sm_scale, *strides, lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        G=G, D=d, KERNEL=kernel, STRIDE=stride, BLOCK_SIZE=block_size, Q_TILE=q_tile,
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D,
        BLOCK_NB=triton.next_power_of_2(((BLOCK_C - 1) * stride + kernel - 1) // block_size + 2),
    )
    return out


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


def block_select(
    q: torch.Tensor, summaries: torch.Tensor, q_start: int,
    kernel: int = 32, stride: int = 16, block_size: int = 64, q_tile: int = 64,
    topk: int = 64, init_blocks: int = 1, window: int = 2048, sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Hq, T, d], summaries [Hkv, max_summaries, d] -> (block_idx [Hkv, n_tiles, max_sel], block_count [Hkv, n_tiles])."""
    scores = block_scores(q, summaries, q_start, kernel, stride, block_size, q_tile, sm_scale)
    return select_blocks(scores, q_start, q.shape[1], block_size, q_tile, topk, init_blocks, window)
