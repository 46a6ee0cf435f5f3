"""RoPE on q and k from a fused q/k/v projection, with k and v appended to one layer's KV cache: one launch.

Semantics (`reference`): qkv [T, (Hq + 2*Hkv) * d] holds, per token, the Hq query heads, then the Hkv key heads,
then the Hkv value heads. Optionally (Qwen3) q and k are first RMS-normed per head over d, as engine/model.py
RMSNorm does (fp32, rounded to the dtype, times the weight, rounded again). Then the rotate-half RoPE of
engine/rope.py: with freqs = positions.float()[:, None] * inv_freq, cos = cos(freqs) * attention_factor and
sin = sin(freqs) * attention_factor (both duplicated over the two halves of d),
out = x * cos + rotate_half(x) * sin in fp32, rounded to the dtype. The rotated k and the v of token t are written
to k_cache[:, positions[t]] and v_cache[:, positions[t]]; the rotated q is returned as [Hq, T, d].

The kernel computes cos/sin itself in fp32 (engine.rope.Rope tables are the same formula, up to fp32 rounding).
It reads positions on the device and never syncs, so it can be captured in a CUDA graph. Positions must be
distinct and below the cache length; nothing checks it (that would sync).
"""

import torch
import triton
import triton.language as tl

from infer.kernels import norm, pdl


def reference(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float,
              k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
              q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
              eps: float | None = None) -> torch.Tensor:
    """Same arguments as rope_append; writes the caches and returns q [Hq, T, d]."""
    heads = qkv.unflatten(1, (-1, head_dim)).transpose(0, 1)  # [Hq + 2*Hkv, T, d]
    q, k, v = heads.split([num_heads, num_kv_heads, num_kv_heads])  # [Hq, T, d], [Hkv, T, d], [Hkv, T, d]
    if q_norm_weight is not None:
        q, k = norm.reference(q, q_norm_weight, eps), norm.reference(k, k_norm_weight, eps)
    cos, sin = cos_sin(positions, inv_freq, attention_factor)  # [T, d]
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k_cache[:, positions] = k
    v_cache[:, positions] = v
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


@triton.jit
def _rope_row(src, dst, w_ptr, cos, sin, eps, offs, mask, HALF: tl.constexpr, QK_NORM: tl.constexpr):
    """One head of one token: load d values at src, (norm,) rotate, store at dst."""
    dtype = dst.dtype.element_ty
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)  # [HALF_BLOCK] first half
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)  # [HALF_BLOCK] second half
    if QK_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1) + tl.sum(x2 * x2)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    tl.store(dst + offs, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(dst + HALF + offs, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rope_append_kernel(
    qkv_ptr, pos_ptr, inv_freq_ptr, q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr,
    T, stride_qkv, stride_kh, stride_kl, stride_vh, stride_vl, attention_factor, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, QK_NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)  # query heads 0..HQ-1, then key heads
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < HALF
    pos = tl.load(pos_ptr + t)
    freqs = pos.to(tl.float32) * tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)  # [HALF_BLOCK]
    cos = tl.cos(freqs) * attention_factor
    sin = tl.sin(freqs) * attention_factor
    src = qkv_ptr + t * stride_qkv + h * (2 * HALF)
    if h < HQ:
        _rope_row(src, q_ptr + (h * T + t) * (2 * HALF), qw_ptr, cos, sin, eps, offs, mask, HALF, QK_NORM)
    else:
        g = (h - HQ).to(tl.int64)  # kv head; int64: g * stride_kh may pass 2^31 in a long cache
        _rope_row(src, k_ptr + g * stride_kh + pos * stride_kl, kw_ptr, cos, sin, eps, offs, mask, HALF, QK_NORM)
        v_src = src + HKV * (2 * HALF)  # value head g
        v_dst = v_ptr + g * stride_vh + pos * stride_vl
        tl.store(v_dst + offs, tl.load(v_src + offs, mask=mask), mask=mask)
        tl.store(v_dst + HALF + offs, tl.load(v_src + HALF + offs, mask=mask), mask=mask)


def rope_append(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float,
                k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                eps: float | None = None) -> torch.Tensor:
    """qkv [T, (Hq + 2*Hkv) * d] (rows may be strided, last dim contiguous), positions [T] int64, inv_freq [d/2]
    fp32, k_cache/v_cache [Hkv, max_len, d] of qkv's dtype (last dim contiguous), q_norm_weight/k_norm_weight [d]
    and eps: all three or none. Writes the caches in place; returns a new contiguous q [Hq, T, d]."""
    T = qkv.shape[0]
    d, half = head_dim, head_dim // 2
    qk_norm = q_norm_weight is not None
    assert (k_norm_weight is not None) == qk_norm and (eps is not None) == qk_norm
    assert d % 2 == 0 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * d and qkv.stride(1) == 1
    assert positions.shape == (T,) and positions.dtype == torch.int64
    assert inv_freq.shape == (half,) and inv_freq.dtype == torch.float32 and inv_freq.is_contiguous()
    for cache in (k_cache, v_cache):
        assert cache.shape[0] == num_kv_heads and cache.shape[2] == d and cache.stride(2) == 1
        assert cache.dtype == qkv.dtype
    for w in (q_norm_weight, k_norm_weight) if qk_norm else ():
        assert w.shape == (d,) and w.dtype == qkv.dtype and w.is_contiguous()
    q = torch.empty(num_heads, T, d, dtype=qkv.dtype, device=qkv.device)  # [Hq, T, d]
    _rope_append_kernel[(T, num_heads + num_kv_heads)](
        qkv, positions, inv_freq, q, k_cache, v_cache, q_norm_weight, k_norm_weight,
        T, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        attention_factor, eps if qk_norm else 0.0,
        HQ=num_heads, HKV=num_kv_heads, HALF=half, HALF_BLOCK=triton.next_power_of_2(half), QK_NORM=qk_norm,
        num_warps=1, **pdl.launch(qkv.device),
    )
    return q
