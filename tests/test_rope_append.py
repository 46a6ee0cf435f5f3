import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch

from infer.engine.config import ModelConfig, RopeConfig
from infer.engine.model import RMSNorm
from infer.engine.rope import Rope
from infer.kernels import pool_keys
from infer.kernels.pool_keys import num_summaries
from infer.kernels.rope_append import reference, rope_append

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}
YARN = RopeConfig(theta=1e6, type="yarn", params={"factor": 4.0, "original_max_position_embeddings": 1024})


def make_rope(Hq, Hkv, d, rope=YARN):
    cfg = ModelConfig(model_type="llama", vocab_size=8, hidden_size=Hq * d, intermediate_size=8, num_layers=1,
                      num_heads=Hq, num_kv_heads=Hkv, head_dim=d, max_position_embeddings=4096, rope=rope)
    return Rope(cfg, torch.device("cpu"))


def setup(Hq, Hkv, d, T, dtype, max_len, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * d, generator=gen).to(dtype)  # [T, (Hq + 2Hkv) d]
    positions = torch.randperm(max_len, generator=gen)[:T]  # [T] distinct, unordered
    k_cache = torch.full((Hkv, max_len, d), float("nan"), dtype=dtype)  # [Hkv, max_len, d]
    return qkv, positions, k_cache, k_cache.clone()


def check_caches(k_cache, v_cache, ref_k, ref_v, positions, dtype):
    torch.testing.assert_close(k_cache[:, positions], ref_k[:, positions], **TOL[dtype])
    assert torch.equal(v_cache[:, positions], ref_v[:, positions])  # v is copied
    untouched = torch.ones(k_cache.shape[1], dtype=torch.bool)
    untouched[positions] = False
    assert k_cache[:, untouched].isnan().all() and v_cache[:, untouched].isnan().all()


# (Hq, Hkv, d, T, dtype): GQA ratios 1, 2, 4; ragged T
CASES = [(2, 2, 64, 1, torch.float32), (4, 2, 128, 9, torch.float16), (8, 2, 64, 5, torch.float16),
         (4, 1, 128, 3, torch.float32), (6, 3, 96, 7, torch.float16)]


def rotate_half_rope(x, cos, sin):
    """x [H, T, d] -> x * cos + rotate_half(x) * sin, in fp32, rounded to x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    return (xf * cos + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * sin).to(x.dtype)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("Hq, Hkv, d, T, dtype", CASES)
def test_rope_append_matches_reference(Hq, Hkv, d, T, dtype, qk_norm):
    rope = make_rope(Hq, Hkv, d)
    qkv, positions, k_cache, v_cache = setup(Hq, Hkv, d, T, dtype, max_len=3000, seed=T * d + qk_norm)
    norm_args = {}
    if qk_norm:
        gen = torch.Generator().manual_seed(7)
        norm_args = dict(q_norm_weight=(1 + 0.2 * torch.randn(d, generator=gen)).to(dtype),
                         k_norm_weight=(1 + 0.2 * torch.randn(d, generator=gen)).to(dtype), eps=1e-6)
    args = rope.scaling(3000)  # (inv_freq [d/2], attention_factor)
    shape = (Hq, Hkv, d)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_q = reference(qkv, positions, *args, ref_k, ref_v, *shape, **norm_args)
    q = rope_append(qkv, positions, *args, k_cache, v_cache, *shape, **norm_args)
    assert q.shape == (Hq, T, d) and q.is_contiguous()
    torch.testing.assert_close(q, ref_q, **TOL[dtype])
    if dtype != torch.float32:
        assert (q == ref_q).float().mean().item() > 0.98  # rounded where the reference rounds
    check_caches(k_cache, v_cache, ref_k, ref_v, positions, dtype)

    # against the model's RMSNorm modules, the Rope tables and the rotate-half formula written out here
    heads = qkv.unflatten(1, (-1, d)).transpose(0, 1)  # [Hq + 2Hkv, T, d]
    mq, mk = heads[:Hq], heads[Hq:Hq + Hkv]
    if qk_norm:
        q_norm, k_norm = RMSNorm(d, 1e-6).to(dtype), RMSNorm(d, 1e-6).to(dtype)
        q_norm.weight.data.copy_(norm_args["q_norm_weight"])
        k_norm.weight.data.copy_(norm_args["k_norm_weight"])
        mq, mk = q_norm(mq), k_norm(mk)
    cos, sin = rope.cos_sin(positions, 3000)  # [T, d]
    torch.testing.assert_close(q, rotate_half_rope(mq, cos, sin), **TOL[dtype])
    torch.testing.assert_close(k_cache[:, positions], rotate_half_rope(mk, cos, sin), **TOL[dtype])


def test_strided_qkv_and_cache_views():
    """qkv rows inside a wider buffer; caches as one layer of a [layers, Hkv, max_len, d] buffer; default RoPE."""
    Hq, Hkv, d, T = 4, 2, 64, 6
    rope = make_rope(Hq, Hkv, d, RopeConfig())
    qkv, positions, _, _ = setup(Hq, Hkv, d, T, torch.float16, max_len=100, seed=3)
    wide = torch.zeros(T, qkv.shape[1] + 40, dtype=torch.float16)
    wide[:, 8:8 + qkv.shape[1]] = qkv
    k_all = torch.full((3, Hkv, 100, d), float("nan"), dtype=torch.float16)
    v_all = k_all.clone()
    ref_k, ref_v = k_all[1].clone(), v_all[1].clone()
    inv_freq, attention_factor = rope.scaling(100)
    ref_q = reference(qkv, positions, inv_freq, attention_factor, ref_k, ref_v, Hq, Hkv, d)
    q = rope_append(wide[:, 8:8 + qkv.shape[1]], positions, inv_freq, attention_factor, k_all[1], v_all[1], Hq, Hkv, d)
    torch.testing.assert_close(q, ref_q, **TOL[torch.float16])
    check_caches(k_all[1], v_all[1], ref_k, ref_v, positions, torch.float16)
    assert k_all[[0, 2]].isnan().all() and v_all[[0, 2]].isnan().all()  # other layers untouched


@pytest.mark.parametrize("kernel, stride, qk_norm, dtype", [(32, 16, False, torch.float16), (24, 12, True, torch.float32),
                                                            (16, 16, False, torch.float32)])
def test_summaries_pooled_as_the_keys_are_appended(kernel, stride, qk_norm, dtype):
    """Calls of ragged lengths at consecutive positions (prefill chunks, decode steps, verification passes) write
    the summary of every window their keys complete, equal to pooling the cache afterwards, and nothing else."""
    Hq, Hkv, d, max_len = 4, 2, 64, 300
    rope = make_rope(Hq, Hkv, d)
    inv_freq, attention_factor = rope.scaling(max_len)
    gen = torch.Generator().manual_seed(kernel)
    norms = dict(q_norm_weight=(1 + 0.2 * torch.randn(d, generator=gen)).to(dtype),
                 k_norm_weight=(1 + 0.2 * torch.randn(d, generator=gen)).to(dtype), eps=1e-6) if qk_norm else {}
    k_cache = torch.full((Hkv, max_len, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    summaries = torch.full((Hkv, num_summaries(max_len, kernel, stride), d), float("nan"), dtype=dtype)
    ref_summaries = summaries.clone()
    pool = dict(kernel=kernel, stride=stride)
    L = 0
    for T in [45, 1, 1, 5, 40, *([1] * 20), 8, 3, 100]:
        qkv = torch.randn(T, (Hq + 2 * Hkv) * d, generator=gen).to(dtype)
        positions = torch.arange(L, L + T)
        ref_q = reference(qkv, positions, inv_freq, attention_factor, ref_k, ref_v, Hq, Hkv, d, **norms,
                          summaries=ref_summaries, **pool)
        q = rope_append(qkv, positions, inv_freq, attention_factor, k_cache, v_cache, Hq, Hkv, d, **norms,
                        summaries=summaries, **pool)
        L += T
        C = num_summaries(L, kernel, stride)
        torch.testing.assert_close(q, ref_q, **TOL[dtype])
        torch.testing.assert_close(k_cache[:, :L], ref_k[:, :L], **TOL[dtype])
        if C:
            pooled = pool_keys.reference(k_cache, 0, C, kernel, stride)
            torch.testing.assert_close(summaries[:, :C], pooled, **TOL[dtype])
            torch.testing.assert_close(ref_summaries[:, :C], pooled, **TOL[dtype])
        assert summaries[:, C:].isnan().all() and ref_summaries[:, C:].isnan().all()


def test_rope_at_positions_past_100k():
    """Llama-3 frequencies at positions near 128K, where the kernel reduces the angles by 2 pi itself."""
    Hq, Hkv, d, T = 2, 1, 128, 4
    rope = make_rope(Hq, Hkv, d, RopeConfig(theta=500000.0))
    qkv, _, k_cache, v_cache = setup(Hq, Hkv, d, T, torch.float32, max_len=8, seed=5)
    positions = torch.tensor([131071, 105000, 99999, 123457])
    big_k = torch.full((Hkv, 131072, d), float("nan"))
    ref_k = big_k.clone()
    inv_freq, attention_factor = rope.scaling(131072)
    ref_q = reference(qkv, positions, inv_freq, attention_factor, ref_k, ref_k.clone(), Hq, Hkv, d)
    q = rope_append(qkv, positions, inv_freq, attention_factor, big_k, big_k.clone(), Hq, Hkv, d)
    torch.testing.assert_close(q, ref_q, **TOL[torch.float32])
    torch.testing.assert_close(big_k[:, positions], ref_k[:, positions], **TOL[torch.float32])
