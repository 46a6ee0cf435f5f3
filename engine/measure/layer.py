"""One attention layer as the engine runs it (the Llama-3-8B layer by default), for the benchmarks and the checks:
random inputs, the key summaries, the prefill selection per chunk and the decode step with its positions on the
device."""

import torch

from infer.kernels import block_select, pool_keys, sparse_attention, sparse_decode

from ..attention import DECODE_Q_TILE
from ..config import SparseConfig


def attention_inputs(n: int, heads: int, kv_heads: int, head_dim: int, dtype, device, seed: int = 0):
    """Random q [heads, n, d] and k, v [kv_heads, n, d]."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(heads, n, head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(kv_heads, n, head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(kv_heads, n, head_dim, generator=g, device=device, dtype=dtype)
    return q, k, v


def new_summaries(k: torch.Tensor, s: SparseConfig) -> torch.Tensor:
    """An unwritten summary buffer [Hkv, C, d] for the keys k [Hkv, n, d]."""
    n_sum = max(1, pool_keys.num_summaries(k.shape[1], s.kernel_size, s.kernel_stride))
    return torch.empty(k.shape[0], n_sum, k.shape[2], dtype=k.dtype, device=k.device)


def select_chunk(q: torch.Tensor, summaries: torch.Tensor, start: int, s: SparseConfig,
                 tuning: block_select.Tuning = block_select.TUNING):
    """The engine's prefill selection (q_tile = block_size) for q [Hq, T, d] at positions start..start+T-1."""
    return block_select.block_select(q, summaries, start, s.kernel_size, s.kernel_stride, s.block_size, s.block_size,
                                     s.topk, s.init_blocks, s.window_size, tuning=tuning)


def sparse_prefill(q, k, v, summaries, out, s: SparseConfig, chunk: int, attend: bool = True) -> torch.Tensor:
    """Our causal prefill of one layer, in query chunks as the engine runs it: pool the windows each chunk completes,
    score and select blocks, attend. q [Hq, n, d], k, v [Hkv, n, d]; writes out [Hq, n, d]."""
    n = q.shape[1]
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        first, last = (pool_keys.num_summaries(x, s.kernel_size, s.kernel_stride) for x in (start, end))
        pool_keys.pool_keys(k, summaries, first, last, s.kernel_size, s.kernel_stride)
        idx, cnt = select_chunk(q[:, start:end], summaries, start, s)
        if attend:
            sparse_attention.sparse_attention(q[:, start:end], k, v, start, idx, cnt, q_tile=s.block_size,
                                              block_size=s.block_size, out=out[:, start:end])
    return out


def select_all(q, summaries, s: SparseConfig, chunk: int):
    """The selection of sparse_prefill (summaries of all keys written), tiles of all chunks concatenated:
    (block_idx [Hkv, n_tiles, max_sel], block_count [Hkv, n_tiles])."""
    assert chunk % s.block_size == 0
    parts = [select_chunk(q[:, a:a + chunk], summaries, a, s) for a in range(0, q.shape[1], chunk)]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def decode_select(q, summaries, L: int, s: SparseConfig, start: torch.Tensor | None = None,
                  tickets: torch.Tensor | None = None, tuning: block_select.Tuning = block_select.TUNING):
    """The engine's decode selection for q [Hq, T, d] at positions L-T..L-1: one tile. start: L-T in a device
    int32 [1] tensor, as the engine passes it (the selection then sized to the capacity L), else an int. tickets:
    block_select.new_tickets' buffer (a selection over many blocks needs it)."""
    return block_select.block_select(q, summaries, L - q.shape[1] if start is None else start, s.kernel_size,
                                     s.kernel_stride, s.block_size, DECODE_Q_TILE, s.topk, s.init_blocks,
                                     s.window_size, max_len=L, tickets=tickets, tuning=tuning)


def sparse_decode_step(q, k, v, summaries, s: SparseConfig, tuning: block_select.Tuning = block_select.TUNING):
    """Our decode attention of q [Hq, T, d] at positions L-T..L-1 over the L = k.shape[1] keys (select, attend), as
    the engine calls it: the positions in device tensors, made here once, so the returned step launches only the
    selection and attention kernels."""
    T, L = q.shape[1], k.shape[1]
    start = torch.full((1,), L - T, dtype=torch.int32, device=q.device)
    length = start + T
    tickets = block_select.new_tickets(q.device)

    def step() -> torch.Tensor:
        idx, cnt = decode_select(q, summaries, L, s, start, tickets, tuning)
        return sparse_decode.sparse_decode(q, k, v, length, idx, cnt, block_size=s.block_size)

    return step


def selection_mask(block_idx, block_count, n_blocks: int) -> torch.Tensor:
    """Selected blocks as a dense mask [Hkv, n_tiles, n_blocks] (bool)."""
    valid = torch.arange(block_idx.shape[2], device=block_idx.device) < block_count[..., None]
    cols = torch.where(valid, block_idx, n_blocks).long()  # padding -> a spare column
    sel = torch.zeros(*block_idx.shape[:2], n_blocks + 1, dtype=torch.bool, device=block_idx.device)
    return sel.scatter_(2, cols, True)[..., :n_blocks]
