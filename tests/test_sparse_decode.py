import os

os.environ["TRITON_INTERPRET"] = "1"  # CPU; bf16 tl.dot is broken in the interpreter, so fp16/fp32 only

import pytest
import torch
import torch.nn.functional as F

from infer.kernels.sparse_decode import choose_num_splits, reference, sparse_decode

B = 64  # KV block size
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=1e-2)}


def make_inputs(Hkv, G, d, T, L, dtype, gen):
    """q [Hq, T, d]; caches [Hkv, max_len, d] whose dead tail (positions >= L) is NaN."""
    q = torch.randn(Hkv * G, T, d, generator=gen).to(dtype)
    k = torch.randn(Hkv, L + 29, d, generator=gen).to(dtype)
    v = torch.randn(Hkv, L + 29, d, generator=gen).to(dtype)
    k[:, L:] = float("nan")
    v[:, L:] = float("nan")
    return q, k, v


def random_selection(Hkv, L, max_sel, gen):
    """Per kv head: the last block, block 0, random others; min(max_sel, available) blocks, -1 padded."""
    n_avail = -(-L // B)
    n = min(max_sel, n_avail)
    idx = torch.full((Hkv, 1, max_sel), -1, dtype=torch.int32)  # [Hkv, 1, max_sel]
    for g in range(Hkv):
        order = [n_avail - 1, 0] + torch.randperm(n_avail, generator=gen).tolist()
        idx[g, 0, :n] = torch.tensor(sorted(list(dict.fromkeys(order))[:n]), dtype=torch.int32)
    return idx, torch.full((Hkv, 1), n, dtype=torch.int32)


def run(q, k, v, L, idx, cnt, **kw):
    """Kernel call into a NaN-poisoned output buffer; every element must be written."""
    out = torch.full_like(q, float("nan"))
    o = sparse_decode(q, k, v, L, idx, cnt, out=out, **kw)
    assert o.data_ptr() == out.data_ptr() and torch.isfinite(o).all()
    return o


# (Hkv, G, d, T, L, max_sel, dtype)
CASES = [
    (2, 1, 64, 1, 300, 3, torch.float32),
    (1, 2, 128, 4, 131, 8, torch.float16),  # max_sel > available blocks
    (2, 4, 64, 4, 64, 2, torch.float32),  # L on a block boundary, single block
    (1, 8, 64, 1, 517, 5, torch.float16),
    (2, 8, 128, 4, 390, 4, torch.float32),  # 32 rows per group
    (1, 4, 64, 8, 200, 4, torch.float16),  # T=8 straddles a block boundary
]


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("Hkv,G,d,T,L,max_sel,dtype", CASES)
def test_matches_reference(Hkv, G, d, T, L, max_sel, dtype, num_splits):
    gen = torch.Generator().manual_seed(L * 10 + T)
    q, k, v = make_inputs(Hkv, G, d, T, L, dtype, gen)
    idx, cnt = random_selection(Hkv, L, max_sel, gen)
    o = run(q, k, v, L, idx, cnt, num_splits=num_splits)
    assert o.dtype == dtype
    torch.testing.assert_close(o.float(), reference(q, k, v, L, idx, cnt), **TOL[dtype])


def test_num_splits_agree():
    """1 split, uneven splits, and more splits than selected blocks (empty splits) give one result."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_inputs(2, 4, 64, 4, 700, torch.float32, gen)
    idx, cnt = random_selection(2, 700, 7, gen)
    outs = [run(q, k, v, 700, idx, cnt, num_splits=s, block_n=bn) for s, bn in [(1, 64), (2, 32), (4, 64), (16, 64)]]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def test_choose_num_splits():
    assert choose_num_splits(max_sel=64, n_kv_heads=2, target_programs=264) == 64  # capped by blocks
    assert choose_num_splits(max_sel=64, n_kv_heads=8, target_programs=264) == 33
    assert choose_num_splits(max_sel=64, n_kv_heads=512, target_programs=264) == 1


@pytest.mark.parametrize("G,d,dtype", [(1, 128, torch.float32), (4, 64, torch.float16), (8, 64, torch.float32)])
@pytest.mark.parametrize("T,L", [(1, 333), (4, 260)])
def test_all_blocks_equals_dense_sdpa(G, d, dtype, T, L):
    Hkv = 2
    gen = torch.Generator().manual_seed(G + L)
    q, k, v = make_inputs(Hkv, G, d, T, L, dtype, gen)
    n = -(-L // B)
    idx = torch.arange(n, dtype=torch.int32).expand(Hkv, 1, n).contiguous()
    o = run(q, k, v, L, idx, torch.full((Hkv, 1), n, dtype=torch.int32), num_splits=2)
    causal = torch.arange(L)[None, :] <= L - T + torch.arange(T)[:, None]  # [T, L]
    dense = F.scaled_dot_product_attention(q.float(), k[:, :L].float(), v[:, :L].float(),
                                           attn_mask=causal, enable_gqa=True)
    torch.testing.assert_close(o.float(), dense, **TOL[dtype])


def test_no_visible_key_gives_zero():
    """Only the last block selected: for T=4 at L=66 the queries at 62, 63 see nothing."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_inputs(1, 2, 64, 4, 66, torch.float32, gen)
    idx = torch.tensor([[[1, -1]]], dtype=torch.int32)
    o = run(q, k, v, 66, idx, torch.ones(1, 1, dtype=torch.int32), num_splits=2)
    assert (o[:, :2] == 0).all() and (o[:, 2:] != 0).any()
    torch.testing.assert_close(o, reference(q, k, v, 66, idx, torch.ones(1, 1, dtype=torch.int32)), **TOL[torch.float32])


def device_length(L):
    return torch.tensor([L], dtype=torch.int32)  # [1]


@pytest.mark.parametrize("Hkv,G,d,T,L,max_sel,dtype", CASES)
def test_device_length_equals_int(Hkv, G, d, T, L, max_sel, dtype):
    gen = torch.Generator().manual_seed(L * 10 + T)
    q, k, v = make_inputs(Hkv, G, d, T, L, dtype, gen)
    idx, cnt = random_selection(Hkv, L, max_sel, gen)
    for sel in ((idx, cnt), (None, None)):  # sparse, dense
        assert torch.equal(run(q, k, v, device_length(L), *sel), run(q, k, v, L, *sel))


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("T,L", [(1, 40), (2, 130), (3, 5), (4, 200), (5, 333)])  # L < B, L % B != 0
def test_dense_equals_reference_and_sdpa(G, T, L):
    Hkv, d, dtype = 2, 64, torch.float32
    gen = torch.Generator().manual_seed(G * 1000 + L)
    q, k, v = make_inputs(Hkv, G, d, T, L, dtype, gen)
    k, v = (torch.cat([x, x[:, -1:].expand(Hkv, 200, d)], 1) for x in (k, v))  # more splits than live blocks
    o = run(q, k, v, device_length(L), None, None)
    torch.testing.assert_close(o, reference(q, k, v, device_length(L)), **TOL[dtype])
    causal = torch.arange(L)[None, :] <= L - T + torch.arange(T)[:, None]  # [T, L]
    dense = F.scaled_dot_product_attention(q, k[:, :L], v[:, :L], attn_mask=causal, enable_gqa=True)
    torch.testing.assert_close(o, dense, **TOL[dtype])


def test_one_device_length_many_values():
    """One length tensor and one output buffer, rewritten between calls (as a replayed CUDA graph does): each
    call attends over the length the tensor holds, with the grid the cache's capacity gives."""
    Hkv, G, d, T = 2, 2, 64, 2
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_inputs(Hkv, G, d, T, 400, torch.float32, gen)
    idx, cnt = random_selection(Hkv, 100, 4, gen)  # blocks 0 and 1 (past L for L <= 64: masked)
    L_dev, out = device_length(0), torch.empty_like(q)
    for L in (400, 64, 3, 129, 250):
        L_dev.fill_(L)
        for sel in ((idx, cnt), (None, None)):
            o = sparse_decode(q, k, v, L_dev, *sel, out=out)
            assert o.data_ptr() == out.data_ptr()
            torch.testing.assert_close(o, reference(q, k, v, L, *sel), **TOL[torch.float32])


@pytest.mark.parametrize("G,T,L", [(1, 3, 300), (4, 5, 260), (8, 2, 517)])
def test_selection_per_query_equals_each_query_alone(G, T, L):
    """block_idx [Hkv, T, max_sel]: query t attends its own blocks with the bits of a call for it alone at
    length L - T + t + 1 (what speculative verification needs)."""
    Hkv = 2
    gen = torch.Generator().manual_seed(G * 100 + T)
    q, k, v = make_inputs(Hkv, G, 64, T, L, torch.float32, gen)
    alone = [random_selection(Hkv, L - T + t + 1, 5, gen) for t in range(T)]
    idx, cnt = (torch.cat(parts, 1) for parts in zip(*alone))  # [Hkv, T, 5], [Hkv, T]
    o = run(q, k, v, device_length(L), idx, cnt)
    each = torch.cat([run(q[:, t:t + 1], k, v, L - T + t + 1, *alone[t]) for t in range(T)], 1)
    assert torch.equal(o, each)
    torch.testing.assert_close(o, reference(q, k, v, L, idx, cnt), **TOL[torch.float32])
