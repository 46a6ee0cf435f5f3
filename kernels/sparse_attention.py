"""Block-sparse causal attention, prefill (InfLLM-V2 / MiniCPM4 style).

Queries of one call are cut into tiles of `q_tile` consecutive queries. For each kv head g and
tile i the selector picks KV blocks of `block_size` keys: block_idx[g, i, :block_count[g, i]]
(unique ids, sorted ascending, padded with -1). Every query head of the GQA group of g (heads
g*G .. g*G+G-1) attends to the keys of those blocks, restricted causally to its own position.

Kernel layout: one program per (row chunk, query tile, kv head). The G heads of a group share the
selection, so their queries are packed together as the rows of one tile (row r = t_local*G + j,
query t_local of the tile, head j of the group) and cut into chunks of BLOCK_M rows. Each selected
KV block is then loaded once per chunk instead of once per query head, the block list is read once,
and small tiles still fill the MMA M dimension. K/V are indexed by kv head, never expanded.
"""

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _sparse_attn_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, cnt_ptr,
    stride_qh, stride_qt, stride_kh, stride_kt, stride_vh, stride_vt, stride_oh, stride_ot,
    stride_ih, stride_it, stride_ch, stride_ct,
    T, q_start, qk_scale,
    GROUP: tl.constexpr, Q_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N  # kernel steps per selected block

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] row = t_local * GROUP + j
    t = tile * Q_TILE + rows // GROUP  # [BLOCK_M] query index within the call
    h = kvh * GROUP + rows % GROUP  # [BLOCK_M] query head
    row_ok = (rows < GROUP * Q_TILE) & (t < T)
    qpos = q_start + t  # [BLOCK_M] absolute position
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(q_ptr + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    n_sel = tl.load(cnt_ptr + kvh * stride_ch + tile * stride_ct)
    n_sel = tl.where(tile * Q_TILE + pid_m * BLOCK_M // GROUP < T, n_sel, 0)  # chunk past the last query
    idx_base = idx_ptr + kvh * stride_ih + tile * stride_it
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    L = q_start + T

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for i in range(0, n_sel * SUB):
        blk = tl.load(idx_base + i // SUB)
        kpos = blk * BLOCK_SIZE + (i % SUB) * BLOCK_N + offs_n  # [BLOCK_N]
        k = tl.load(k_base + kpos[None, :] * stride_kt + offs_d[:, None],
                    mask=kpos[None, :] < L, other=0.0)  # [D, BLOCK_N]
        s = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(kpos[None, :] <= qpos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kpos[:, None] * stride_vt + offs_d[None, :],
                    mask=kpos[:, None] < L, other=0.0)  # [BLOCK_N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no visible key -> 0
    tl.store(o_ptr + h[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def every_block(num_kv_heads, n_tiles, L, block_size=64, device=None):
    """A selection of every block of keys 0..L-1 for each tile (dense attention through the block kernels; the
    causal mask trims the blocks past a tile): (block_idx [Hkv, n_tiles, n] int32, block_count [Hkv, n_tiles])."""
    n = triton.cdiv(L, block_size)
    block_idx = torch.arange(n, dtype=torch.int32, device=device).expand(num_kv_heads, n_tiles, n).contiguous()
    block_count = torch.full((num_kv_heads, n_tiles), n, dtype=torch.int32, device=device)
    return block_idx, block_count


def reference(q, k_cache, v_cache, q_start, block_idx, block_count, q_tile=64, block_size=64, sm_scale=None):
    """Exact semantics in plain PyTorch, computed and returned in fp32.

    q [Hq, T, d] at positions q_start..q_start+T-1; k_cache, v_cache [Hkv, >=L, d] with L = q_start+T;
    block_idx [Hkv, n_tiles, max_sel], block_count [Hkv, n_tiles], n_tiles = ceil(T / q_tile).
    Query t (tile t // q_tile, head h, kv head h // G) attends to key j iff j <= q_start + t and
    block j // block_size is among the first block_count entries of its tile's block_idx.
    A query with no visible key outputs 0.
    """
    Hq, T, d = q.shape
    Hkv = k_cache.shape[0]
    L = q_start + T
    n_blocks = triton.cdiv(L, block_size)
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    dev = q.device

    valid = torch.arange(block_idx.shape[2], device=dev) < block_count[..., None]  # [Hkv, n_tiles, max_sel]
    cols = torch.where(valid, block_idx, n_blocks).long()  # padding -> spare column n_blocks
    sel = torch.zeros(*block_idx.shape[:2], n_blocks + 1, dtype=torch.bool, device=dev)
    sel = sel.scatter_(2, cols, True)[..., :n_blocks]  # [Hkv, n_tiles, n_blocks]
    key_sel = sel.repeat_interleave(block_size, 2)[..., :L].repeat_interleave(q_tile, 1)[:, :T]  # [Hkv, T, L]
    causal = torch.arange(L, device=dev)[None, :] <= q_start + torch.arange(T, device=dev)[:, None]  # [T, L]
    mask = (key_sel & causal).repeat_interleave(Hq // Hkv, 0)  # [Hq, T, L]

    k = k_cache[:, :L].float().repeat_interleave(Hq // Hkv, 0)  # [Hq, L, d]
    v = v_cache[:, :L].float().repeat_interleave(Hq // Hkv, 0)
    s = (q.float() @ k.transpose(1, 2) * sm_scale).masked_fill(~mask, float("-inf"))  # [Hq, T, L]
    p = torch.softmax(s, -1).nan_to_num(0.0)  # fully masked rows -> 0
    return p @ v  # [Hq, T, d]


def sparse_attention(q, k_cache, v_cache, q_start, block_idx, block_count, q_tile=64, block_size=64,
                     sm_scale=None, out=None, block_m=64, block_n=None, num_warps=4, num_stages=2):
    """Block-sparse causal attention of q [Hq, T, d] over the cache (semantics: `reference`).

    k_cache, v_cache [Hkv, max_len, d]; keys 0..q_start+T-1 must be live. block_idx int32
    [Hkv, n_tiles, max_sel], block_count int32 [Hkv, n_tiles], n_tiles = ceil(T / q_tile).
    Returns o [Hq, T, d] in q's dtype (written into `out` when given). Feeding every causal block
    of each tile gives dense causal attention. block_m/block_n/num_warps/num_stages are tuning knobs:
    block_m rows of (query, head) pairs per program, block_n keys per step (divides block_size; default
    min(64, block_size)).
    """
    Hq, T, d = q.shape
    Hkv = k_cache.shape[0]
    n_tiles = triton.cdiv(T, q_tile)
    block_n = block_n or min(64, block_size)
    assert Hq % Hkv == 0 and d == triton.next_power_of_2(d) and block_size % block_n == 0
    assert block_idx.shape[:2] == (Hkv, n_tiles) and block_count.shape == (Hkv, n_tiles)
    assert q_start + T <= k_cache.shape[1] and block_idx.stride(2) == 1
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    G = Hq // Hkv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    o = torch.empty_like(q) if out is None else out  # [Hq, T, d]
    assert o.shape == q.shape and o.stride(2) == 1

    grid = (triton.cdiv(G * q_tile, block_m), n_tiles, Hkv)
    _sparse_attn_fwd[grid](
        q, k_cache, v_cache, o, block_idx, block_count,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        o.stride(0), o.stride(1), block_idx.stride(0), block_idx.stride(1), block_count.stride(0), block_count.stride(1),
        T, q_start, sm_scale * LOG2E,
        GROUP=G, Q_TILE=q_tile, BLOCK_SIZE=block_size, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return o
