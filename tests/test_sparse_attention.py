import os

os.environ["TRITON_INTERPRET"] = "1"  # CPU; bf16 tl.dot is broken in the interpreter, so fp16/fp32 only

import pytest
import torch
import torch.nn.functional as F

from infer.kernels.sparse_attention import reference, sparse_attention

B = 64  # KV block size
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=1e-2)}


def make_inputs(Hkv, G, d, T, q_start, dtype, gen):
    """q [Hq, T, d]; caches [Hkv, max_len, d] whose dead tail (positions >= L) is NaN."""
    L = q_start + T
    max_len = L + 37
    q = torch.randn(Hkv * G, T, d, generator=gen).to(dtype)
    k = torch.randn(Hkv, max_len, d, generator=gen).to(dtype)
    v = torch.randn(Hkv, max_len, d, generator=gen).to(dtype)
    k[:, L:] = float("nan")
    v[:, L:] = float("nan")
    return q, k, v


def tile_last_block(i, T, q_start, q_tile):
    """Block holding the last query of tile i (the diagonal block)."""
    return (q_start + min((i + 1) * q_tile, T) - 1) // B


def random_selection(Hkv, T, q_start, q_tile, max_sel, gen):
    """Random causal selection of min(max_sel, available) or one fewer blocks per (kv head, tile):
    the diagonal block first, then block 0, then random others."""
    n_tiles = -(-T // q_tile)
    idx = torch.full((Hkv, n_tiles, max_sel), -1, dtype=torch.int32)  # [Hkv, n_tiles, max_sel]
    cnt = torch.zeros(Hkv, n_tiles, dtype=torch.int32)  # [Hkv, n_tiles]
    for g in range(Hkv):
        for i in range(n_tiles):
            n_avail = tile_last_block(i, T, q_start, q_tile) + 1
            order = [n_avail - 1, 0] + torch.randperm(n_avail, generator=gen).tolist()
            n = max(1, min(max_sel, n_avail) - int(torch.randint(0, 2, (1,), generator=gen)))
            chosen = sorted(list(dict.fromkeys(order))[:n])
            idx[g, i, :n] = torch.tensor(chosen, dtype=torch.int32)
            cnt[g, i] = n
    return idx, cnt


def all_causal_blocks(Hkv, T, q_start, q_tile):
    n_tiles = -(-T // q_tile)
    n_max = tile_last_block(n_tiles - 1, T, q_start, q_tile) + 1
    idx = torch.full((Hkv, n_tiles, n_max), -1, dtype=torch.int32)
    cnt = torch.zeros(Hkv, n_tiles, dtype=torch.int32)
    for i in range(n_tiles):
        n = tile_last_block(i, T, q_start, q_tile) + 1
        idx[:, i, :n] = torch.arange(n, dtype=torch.int32)
        cnt[:, i] = n
    return idx, cnt


def run(q, k, v, q_start, idx, cnt, **kw):
    """Kernel call into a NaN-poisoned output buffer; every element must be written."""
    out = torch.full_like(q, float("nan"))
    o = sparse_attention(q, k, v, q_start, idx, cnt, out=out, **kw)
    assert o.data_ptr() == out.data_ptr() and torch.isfinite(o).all()
    return o


# (Hkv, G, d, T, q_start, q_tile, max_sel, dtype, block_m, block_n)
CASES = [
    (2, 1, 64, 100, 0, 64, 3, torch.float32, 64, 64),  # ragged T, partial last block
    (1, 2, 128, 77, 50, 64, 8, torch.float16, 64, 32),  # chunked prefill, max_sel > available blocks
    (2, 4, 64, 130, 200, 32, 4, torch.float16, 32, 64),  # tiles smaller than a block
    (1, 8, 64, 40, 90, 64, 2, torch.float32, 128, 64),  # G=8: 512 rows per tile in chunks of 128
    (1, 4, 128, 150, 3, 64, 16, torch.float32, 64, 32),
    (2, 2, 64, 200, 17, 128, 3, torch.float16, 64, 64),  # tiles spanning several diagonal blocks
]


@pytest.mark.parametrize("Hkv,G,d,T,q_start,q_tile,max_sel,dtype,block_m,block_n", CASES)
def test_matches_reference(Hkv, G, d, T, q_start, q_tile, max_sel, dtype, block_m, block_n):
    gen = torch.Generator().manual_seed(T * 1000 + q_start)
    q, k, v = make_inputs(Hkv, G, d, T, q_start, dtype, gen)
    idx, cnt = random_selection(Hkv, T, q_start, q_tile, max_sel, gen)
    o = run(q, k, v, q_start, idx, cnt, q_tile=q_tile, block_m=block_m, block_n=block_n)
    assert o.dtype == dtype
    torch.testing.assert_close(o.float(), reference(q, k, v, q_start, idx, cnt, q_tile=q_tile), **TOL[dtype])


@pytest.mark.parametrize("G,d,dtype", [(1, 64, torch.float32), (2, 128, torch.float16),
                                       (4, 64, torch.float16), (8, 64, torch.float32)])
@pytest.mark.parametrize("T,q_start", [(150, 0), (70, 130)])
def test_all_blocks_equals_dense_sdpa(G, d, dtype, T, q_start):
    Hkv = 2
    gen = torch.Generator().manual_seed(G * 7 + T)
    q, k, v = make_inputs(Hkv, G, d, T, q_start, dtype, gen)
    idx, cnt = all_causal_blocks(Hkv, T, q_start, 64)
    o = run(q, k, v, q_start, idx, cnt, sm_scale=0.1)
    L = q_start + T
    causal = torch.arange(L)[None, :] <= q_start + torch.arange(T)[:, None]  # [T, L]
    dense = F.scaled_dot_product_attention(q.float(), k[:, :L].float(), v[:, :L].float(),
                                           attn_mask=causal, scale=0.1, enable_gqa=True)
    torch.testing.assert_close(o.float(), dense, **TOL[dtype])


def test_no_visible_key_gives_zero():
    Hkv, G, d, T, q_start = 1, 2, 64, 100, 40
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_inputs(Hkv, G, d, T, q_start, torch.float32, gen)
    idx = torch.tensor([[[1, -1], [-1, -1]]], dtype=torch.int32)  # tile 0: block 1 only; tile 1: nothing
    cnt = torch.tensor([[1, 0]], dtype=torch.int32)
    o = run(q, k, v, q_start, idx, cnt)
    assert (o[:, : 64 - q_start] == 0).all() and (o[:, 64:] == 0).all()  # positions < 64 and tile 1
    assert o[:, 64 - q_start : 64].abs().sum() > 0
    torch.testing.assert_close(o, reference(q, k, v, q_start, idx, cnt), **TOL[torch.float32])
