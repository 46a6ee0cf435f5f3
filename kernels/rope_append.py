"""RoPE on q and k from a fused q/k/v projection, with k and v appended to one layer's KV cache and the key
summaries of the windows the new keys complete written: one launch.

Semantics (`reference`): qkv [T, (Hq + 2*Hkv) * d] holds, per token, the Hq query heads, then the Hkv key heads,
then the Hkv value heads. Optionally (Qwen3) q and k are first RMS-normed per head over d, as engine/model.py
RMSNorm does (fp32, rounded to the dtype, times the weight, rounded again). Then the rotate-half RoPE of
engine/rope.py: with freqs = positions.float()[:, None] * inv_freq, cos = cos(freqs) * attention_factor and
sin = sin(freqs) * attention_factor (both duplicated over the two halves of d),
out = x * cos + rotate_half(x) * sin in fp32, rounded to the dtype. The rotated k and the v of token t are written
to k_cache[:, positions[t]] and v_cache[:, positions[t]]; the rotated q is returned as [Hq, T, d]. With summaries
(sparse attention; positions then consecutive), the summary of each window that ends at one of the positions is
written as pool_keys computes it from the cache.

The kernel computes cos/sin itself in fp32 (engine.rope.Rope tables are the same formula, up to fp32 rounding).
It reads positions on the device and never syncs, so it can be captured in a CUDA graph. Positions must be
distinct and below the cache length; nothing checks it (that would sync). A key program whose position ends a
window pools it: the window's older keys from the cache, the keys of this call (other programs write them) rotated
again from qkv.
"""

import torch
import triton
import triton.language as tl

from infer.kernels import norm, pdl, pool_keys


def reference(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float,
              k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
              q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
              eps: float | None = None, summaries: torch.Tensor | None = None, kernel: int = 32,
              stride: int = 16) -> torch.Tensor:
    """Same arguments as rope_append; writes the caches (and summaries) and returns q [Hq, T, d]."""
    heads = qkv.unflatten(1, (-1, head_dim)).transpose(0, 1)  # [Hq + 2*Hkv, T, d]
    q, k, v = heads.split([num_heads, num_kv_heads, num_kv_heads])  # [Hq, T, d], [Hkv, T, d], [Hkv, T, d]
    if q_norm_weight is not None:
        q, k = norm.reference(q, q_norm_weight, eps), norm.reference(k, k_norm_weight, eps)
    cos, sin = cos_sin(positions, inv_freq, attention_factor)  # [T, d]
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k_cache[:, positions] = k
    v_cache[:, positions] = v
    if summaries is not None:
        first, end = int(positions[0]), int(positions[-1]) + 1
        assert end - first == len(positions), "pooling needs consecutive positions"
        done, written = (pool_keys.num_summaries(n, kernel, stride) for n in (first, end))
        if written > done:
            summaries[:, done:written] = pool_keys.reference(k_cache, done, written, kernel, stride)
    return q.contiguous()


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int64 -> cos, sin [T, d] float32 (rotate-half layout: the d/2 frequencies twice)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, d]
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32, rounded to x's dtype: x [H, T, d], cos/sin [T, d] fp32."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


_TWO_PI_HI = tl.constexpr(6.2831854820251465)  # float32(2 pi)
_TWO_PI_LO = tl.constexpr(-1.7484555314695172e-07)  # 2 pi - _TWO_PI_HI
_INV_TWO_PI = tl.constexpr(0.15915493667125702)


@triton.jit
def _cos_sin(pos, inv_freq, attention_factor):
    """cos and sin of the fp32 angles pos * inv_freq, times attention_factor. Multiples of 2 pi come off first
    (exactly enough, by fma with a two-part 2 pi): libdevice reduces angles past about 1e5 (positions past 100K) by
    a much slower path."""
    x = pos * inv_freq
    turns = tl.floor(x * _INV_TWO_PI + 0.5)
    x = tl.fma(-turns, _TWO_PI_LO, tl.fma(-turns, _TWO_PI_HI, x))
    return tl.cos(x) * attention_factor, tl.sin(x) * attention_factor


@triton.jit
def _rotate(x1, x2, w_ptr, cos, sin, eps, offs, mask, DTYPE: tl.constexpr, HALF: tl.constexpr,
            QK_NORM: tl.constexpr):
    """Heads [R, HALF_BLOCK] given as their two halves (fp32) -> (normed and) rotated halves, rounded to DTYPE."""
    if QK_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]  # [R, 1]
        w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)[None, :]
        x1 = ((x1 * rstd).to(DTYPE).to(tl.float32) * w1).to(DTYPE).to(tl.float32)
        x2 = ((x2 * rstd).to(DTYPE).to(tl.float32) * w2).to(DTYPE).to(tl.float32)
    return (x1 * cos - x2 * sin).to(DTYPE), (x2 * cos + x1 * sin).to(DTYPE)


@triton.jit
def _pool_window(qkv_ptr, pos_ptr, k_head, s_head, kw_ptr, pos, h, inv_freq, attention_factor, eps, offs, mask,
                 stride_qkv, stride_kl, stride_sc, DTYPE: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr,
                 KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_W: tl.constexpr):
    """If the key at pos (key head h - HQ, cached at k_head [1, HALF_BLOCK] + position * stride_kl) ends a window,
    write its summary at s_head. The window's keys before this call's first position are read from the cache; the
    others, which other programs of this call write, are rotated again from qkv (positions are consecutive: key p
    is token p - pos0)."""
    first = pos + 1 - KERNEL
    if (first >= 0) & (first % STRIDE == 0):
        pos0 = tl.load(pos_ptr).to(tl.int64)
        p = first + tl.arange(0, BLOCK_W)  # [BLOCK_W] the window's positions
        in_window = p <= pos
        row_mask = mask[None, :]
        cached = (in_window & (p < pos0))[:, None] & row_mask  # [BLOCK_W, HALF_BLOCK]
        new = (in_window & (p >= pos0))[:, None] & row_mask
        old1 = tl.load(k_head + p[:, None] * stride_kl, mask=cached, other=0.0).to(tl.float32)
        old2 = tl.load(k_head + p[:, None] * stride_kl + HALF, mask=cached, other=0.0).to(tl.float32)
        rows = qkv_ptr + (p - pos0)[:, None] * stride_qkv + h * (2 * HALF) + offs[None, :]
        x1 = tl.load(rows, mask=new, other=0.0).to(tl.float32)  # [BLOCK_W, HALF_BLOCK]
        x2 = tl.load(rows + HALF, mask=new, other=0.0).to(tl.float32)
        cos, sin = _cos_sin(tl.where(p >= pos0, p, 0).to(tl.float32)[:, None], inv_freq, attention_factor)
        y1, y2 = _rotate(x1, x2, kw_ptr, cos, sin, eps, offs, mask, DTYPE, HALF, QK_NORM)
        sum1 = tl.sum(tl.where(new, y1.to(tl.float32), old1), axis=0)  # [HALF_BLOCK]
        sum2 = tl.sum(tl.where(new, y2.to(tl.float32), old2), axis=0)
        s_dst = s_head + (first // STRIDE) * stride_sc + offs
        tl.store(s_dst, (sum1 / KERNEL).to(DTYPE), mask=mask)
        tl.store(s_dst + HALF, (sum2 / KERNEL).to(DTYPE), mask=mask)


@triton.jit
def _rope_append_kernel(
    qkv_ptr, pos_ptr, inv_freq_ptr, q_ptr, k_ptr, v_ptr, s_ptr, qw_ptr, kw_ptr,
    T, stride_qkv, stride_kh, stride_kl, stride_vh, stride_vl, stride_sh, stride_sc, attention_factor, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, QK_NORM: tl.constexpr,
    POOL: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr,
):
    """Program (t, h): head h of token t; query heads 0..HQ-1, then key heads (each with its value head)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < HALF
    row_mask = mask[None, :]  # [1, HALF_BLOCK]
    inv_freq = tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)[None, :]  # [1, HALF_BLOCK]; before the wait:
    pdl.enter(PDL)  # no kernel writes it
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos, sin = _cos_sin(pos.to(tl.float32), inv_freq, attention_factor)  # [1, HALF_BLOCK]
    src = qkv_ptr + t * stride_qkv + h * (2 * HALF) + offs[None, :]  # [1, HALF_BLOCK]: this head's first half
    x1 = tl.load(src, mask=row_mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=row_mask, other=0.0).to(tl.float32)
    if h < HQ:
        y1, y2 = _rotate(x1, x2, qw_ptr, cos, sin, eps, offs, mask, dtype, HALF, QK_NORM)
        dst = q_ptr + (h * T + t) * (2 * HALF) + offs[None, :]
        tl.store(dst, y1, mask=row_mask)
        tl.store(dst + HALF, y2, mask=row_mask)
    else:
        g = (h - HQ).to(tl.int64)  # kv head; int64: g * stride_kh may pass 2^31 in a long cache
        y1, y2 = _rotate(x1, x2, kw_ptr, cos, sin, eps, offs, mask, dtype, HALF, QK_NORM)
        k_head = k_ptr + g * stride_kh + offs[None, :]  # [1, HALF_BLOCK]
        tl.store(k_head + pos * stride_kl, y1, mask=row_mask)
        tl.store(k_head + pos * stride_kl + HALF, y2, mask=row_mask)
        v_src = src + HKV * (2 * HALF)  # value head g
        v_dst = v_ptr + g * stride_vh + pos * stride_vl + offs[None, :]
        tl.store(v_dst, tl.load(v_src, mask=row_mask), mask=row_mask)
        tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=row_mask), mask=row_mask)
        if POOL:
            _pool_window(qkv_ptr, pos_ptr, k_head, s_ptr + g * stride_sh, kw_ptr, pos, h, inv_freq, attention_factor,
                         eps, offs, mask, stride_qkv, stride_kl, stride_sc, dtype, HALF, QK_NORM, KERNEL, STRIDE,
                         BLOCK_W)


def rope_append(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float,
                k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                eps: float | None = None, summaries: torch.Tensor | None = None, kernel: int = 32,
                stride: int = 16) -> torch.Tensor:
    """qkv [T, (Hq + 2*Hkv) * d] (rows may be strided, last dim contiguous), positions [T] int64 or int32, inv_freq
    [d/2] fp32, k_cache/v_cache [Hkv, max_len, d] of qkv's dtype (last dim contiguous), q_norm_weight/k_norm_weight
    [d] and eps: all three or none; summaries [Hkv, max_summaries, d] (last dim contiguous) with kernel and stride:
    pool the windows the keys complete (positions consecutive). Writes the caches in place; returns a new
    contiguous q [Hq, T, d]."""
    T = qkv.shape[0]
    d, half = head_dim, head_dim // 2
    qk_norm = q_norm_weight is not None
    assert (k_norm_weight is not None) == qk_norm and (eps is not None) == qk_norm
    assert d % 2 == 0 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * d and qkv.stride(1) == 1
    assert positions.shape == (T,) and positions.dtype in (torch.int64, torch.int32)
    assert inv_freq.shape == (half,) and inv_freq.dtype == torch.float32 and inv_freq.is_contiguous()
    for cache in (k_cache, v_cache) + (() if summaries is None else (summaries,)):
        assert cache.shape[0] == num_kv_heads and cache.shape[2] == d and cache.stride(2) == 1
        assert cache.dtype == qkv.dtype
    for w in (q_norm_weight, k_norm_weight) if qk_norm else ():
        assert w.shape == (d,) and w.dtype == qkv.dtype and w.is_contiguous()
    pool = summaries is not None
    q = torch.empty(num_heads, T, d, dtype=qkv.dtype, device=qkv.device)  # [Hq, T, d]
    _rope_append_kernel[(T, num_heads + num_kv_heads)](
        qkv, positions, inv_freq, q, k_cache, v_cache, summaries if pool else q, q_norm_weight, k_norm_weight,
        T, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        summaries.stride(0) if pool else 0, summaries.stride(1) if pool else 0, attention_factor,
        eps if qk_norm else 0.0, HQ=num_heads, HKV=num_kv_heads, HALF=half, HALF_BLOCK=triton.next_power_of_2(half),
        QK_NORM=qk_norm, POOL=pool, KERNEL=kernel, STRIDE=stride, BLOCK_W=triton.next_power_of_2(kernel),
        num_warps=4 if pool else 1, **pdl.launch(qkv.device),
    )
    return q
