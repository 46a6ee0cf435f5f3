"""The one attention entry point: every layer's attention over the KV cache goes through `attend`.

Dense: torch SDPA. Sparse (InfLLM-V2): score the pooled key summaries with the queries of each GQA group, keep the
top-k 64-token blocks plus the sink and local-window blocks, then attend exactly over those blocks. On CUDA the
Triton kernels run; elsewhere their plain-torch references do.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from infer.kernels import block_select, sparse_attention, sparse_decode

from .kv_cache import KVCache, Positions

DECODE_MAX_QUERIES = sparse_decode.MAX_QUERIES  # decode and speculative verification: the split-K decode path
DECODE_Q_TILE = 16  # a decode-sized call selects once for all its queries (or per query: per_query)
# cuDNN's SDPA rebuilds its graph for every new length (1.7 ms of host time per call): the others serve prefill
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def pass_context(num_tokens: int):
    """What a forward pass of num_tokens tokens runs its layers' attention in: the SDPA backends for a prompt's
    passes (entered once a pass: entering costs tens of microseconds of host time), nothing for decode-sized ones
    (they never reach SDPA on CUDA)."""
    return sdpa_kernel(SDPA_BACKENDS) if num_tokens > DECODE_MAX_QUERIES else contextlib.nullcontext()


@dataclass
class SelectionRecord:
    """Where sparse attention records, for the stats, the blocks its latest call selected: block_count
    [Hkv, rows] (rows: the query tiles, or the queries of a per-query call) and `end`, the keys its last query
    saw. Passed explicitly (Transformer.forward's `record`) by whoever reads it."""

    block_count: torch.Tensor | None = None
    end: int = 0


def selection_tile(num_q: int, block_size: int) -> int:
    """Queries per selection tile of an attention call of num_q queries: a decode-sized call is one tile."""
    return DECODE_Q_TILE if num_q <= DECODE_MAX_QUERIES else block_size


def uses_sparse(cache: KVCache, end: int) -> bool:
    """Whether attention for queries ending at position `end` takes the sparse path."""
    sparse = cache.sparse
    return sparse is not None and (sparse.mode == "on" or (sparse.mode == "auto" and end > sparse.dense_len))


def latest_read(cache: KVCache, end: int, record: SelectionRecord) -> tuple[str, float]:
    """The attention path ("dense" or "sparse") of the latest query, at position end - 1, and the share of the
    cached keys it read (as `record` holds it: its last row)."""
    if end and uses_sparse(cache, end) and record.block_count is not None:
        blocks = record.block_count[:, -1].float().mean().item()
        return "sparse", min(1.0, blocks * cache.sparse.block_size / end)
    return "dense", 1.0


def attend(q: torch.Tensor, cache: KVCache, layer: int, pos: Positions, q_score: torch.Tensor | None = None,
           record: SelectionRecord | None = None) -> torch.Tensor:
    """Causal attention of queries q [Hq, T, d] at positions pos over the cached keys 0..pos.start+T-1.

    Returns [Hq, T, d]. Grouped-query heads read their shared K/V without expansion. q_score [Hq, T, d]: the
    queries that score blocks for the sparse selection when they are not q (use_nope: the queries before RoPE).
    record: receives the selection of a sparse call.
    """
    num_q = q.shape[1]
    if not uses_sparse(cache, pos.start + num_q):
        return dense_attend(q, cache, layer, pos)
    if 1 < num_q <= DECODE_MAX_QUERIES and not uses_sparse(cache, pos.start + 1):
        # Drafts under verification across dense_len: each query takes the path it would take decoded alone, so
        # speculative decoding stays lossless (sparse_attend gives each query its own blocks likewise).
        return torch.cat([attend(q[:, i:i + 1], cache, layer, pos.query(i),
                                 None if q_score is None else q_score[:, i:i + 1], record) for i in range(num_q)], 1)
    return sparse_attend(q, cache, layer, pos, q_score, record)


def dense_attend(q: torch.Tensor, cache: KVCache, layer: int, pos: Positions) -> torch.Tensor:
    num_q, start = q.shape[1], pos.start
    end = start + num_q
    if q.is_cuda and num_q <= DECODE_MAX_QUERIES:  # split-K over every block, the length read on the device
        return sparse_decode.sparse_decode(q, cache.k[layer], cache.v[layer], pos.ends[-1:], None, None)
    if q.is_cuda and start > 0:  # a prefill chunk after cached tokens: SDPA would need a mask (its slow path)
        selection = sparse_attention.every_block(cache.k.shape[1], triton.cdiv(num_q, 64), end, 64, q.device)
        return sparse_attention.sparse_attention(q, cache.k[layer], cache.v[layer], start, *selection)
    k = cache.k[layer, :, :end]  # [Hkv, L, d]
    v = cache.v[layer, :, :end]  # [Hkv, L, d]
    mask = None
    if num_q > 1 and start > 0:  # a chunk after cached tokens: bottom-right aligned causal mask
        mask = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]  # [T, L]
    out = F.scaled_dot_product_attention(  # in pass_context's backends
        q[None], k[None], v[None], attn_mask=mask, is_causal=num_q > 1 and start == 0, enable_gqa=True
    )
    return out[0]


def select(q: torch.Tensor, cache: KVCache, layer: int, pos: Positions,
           per_query: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks each query tile of each GQA group attends: (block_idx [Hkv, n_tiles, S], block_count [Hkv, n_tiles]).
    per_query (a few queries: drafts under verification): each query selects as decoded alone, one row each."""
    s = cache.sparse
    decode = q.shape[1] <= DECODE_MAX_QUERIES
    q_tile = selection_tile(q.shape[1], s.block_size)
    shape = dict(kernel=s.kernel_size, stride=s.kernel_stride, block_size=s.block_size, q_tile=q_tile)
    summaries = cache.summaries[layer]  # [Hkv, C, d]
    if q.is_cuda:
        start = (pos.ids32 if per_query else pos.ids32[:1]) if decode else pos.start  # decode: read on the device
        return block_select.block_select(q, summaries, start, **shape, topk=s.topk, init_blocks=s.init_blocks,
                                         window=s.window_size, max_len=cache.max_len, per_query=per_query,
                                         tickets=cache.select_tickets)
    if per_query:
        selections = [select(q[:, i:i + 1], cache, layer, pos.query(i)) for i in range(q.shape[1])]
        return tuple(torch.cat(parts, 1) for parts in zip(*selections))  # [Hkv, T, S], [Hkv, T]
    scores = block_select.reference_scores(q, summaries, pos.start, **shape)
    return block_select.select_blocks(scores, pos.start, q.shape[1], s.block_size, q_tile, s.topk, s.init_blocks,
                                      s.window_size)


def sparse_attend(q: torch.Tensor, cache: KVCache, layer: int, pos: Positions,
                  q_score: torch.Tensor | None = None, record: SelectionRecord | None = None) -> torch.Tensor:
    s = cache.sparse
    num_q = q.shape[1]
    end = pos.start + num_q
    q_score = q if q_score is None else q_score
    # drafts under verification: each query selects as decoded alone
    block_idx, block_count = select(q_score, cache, layer, pos, per_query=1 < num_q <= DECODE_MAX_QUERIES)
    if record is not None:
        record.block_count, record.end = block_count, end
    k, v = cache.k[layer], cache.v[layer]  # [Hkv, max_len, d]
    if num_q <= DECODE_MAX_QUERIES:
        if q.is_cuda:
            return sparse_decode.sparse_decode(q, k, v, pos.ends[-1:], block_idx, block_count, block_size=s.block_size)
        return sparse_decode.reference(q, k, v, end, block_idx, block_count, block_size=s.block_size).to(q.dtype)
    if q.is_cuda:
        return sparse_attention.sparse_attention(q, k, v, pos.start, block_idx, block_count, q_tile=s.block_size,
                                                 block_size=s.block_size)
    return sparse_attention.reference(q, k, v, pos.start, block_idx, block_count, q_tile=s.block_size,
                                      block_size=s.block_size).to(q.dtype)
