"""Pooled key summaries for block-sparse attention (InfLLM-V2 style).

Summary c is the mean of the keys in the window [c*stride, c*stride + kernel).
Only complete windows exist: with L keys there are num_summaries(L) of them.
"""

import torch
import triton
import triton.language as tl


def num_summaries(L: int, kernel: int = 32, stride: int = 16) -> int:
    """Number of complete pooling windows over L keys."""
    return 0 if L < kernel else (L - kernel) // stride + 1


def reference(k: torch.Tensor, start: int, end: int, kernel: int = 32, stride: int = 16) -> torch.Tensor:
    """Summaries of windows c in [start, end): fp32 mean of k[:, c*stride : c*stride+kernel], in k's dtype.

    k: [Hkv, max_len, d]. Returns [Hkv, end - start, d].
    """
    span = k[:, start * stride : (end - 1) * stride + kernel].float()  # [Hkv, span, d]
    return span.unfold(1, kernel, stride).mean(-1).to(k.dtype)  # [Hkv, end - start, d]


@triton.jit
def _pool_keys_kernel(
    k_ptr, s_ptr, first, stride_kh, stride_kl, stride_sh, stride_sc,
    D: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (h, i): window first + i of kv head h."""
    h = tl.program_id(0)
    c = first + tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_k[:, None] < KERNEL) & (offs_d[None, :] < D)
    ptrs = k_ptr + h * stride_kh + (c * STRIDE + offs_k)[:, None] * stride_kl + offs_d[None, :]
    k = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_D]
    mean = tl.sum(k, axis=0) / KERNEL  # [BLOCK_D]
    tl.store(s_ptr + h * stride_sh + c * stride_sc + offs_d, mean.to(s_ptr.dtype.element_ty), mask=offs_d < D)


@triton.jit
def num_summaries_on_device(keys, KERNEL: tl.constexpr, STRIDE: tl.constexpr):
    """num_summaries in a kernel."""
    return tl.where(keys < KERNEL, 0, (keys - KERNEL) // STRIDE + 1)


def pool_keys(
    k: torch.Tensor, summaries: torch.Tensor, start: int, end: int, kernel: int = 32, stride: int = 16
) -> None:
    """Write summaries[:, c] for windows c in [start, end), in place (the engine pools as it appends the keys:
    kernels.rope_append).

    k: [Hkv, max_len, d] (last dim contiguous), summaries: [Hkv, max_summaries, d] (last dim contiguous).
    """
    assert (end - 1) * stride + kernel <= k.shape[1] and end <= summaries.shape[1]
    assert k.stride(-1) == 1 and summaries.stride(-1) == 1
    if end > start:
        Hkv, _, d = k.shape
        _pool_keys_kernel[(Hkv, end - start)](
            k, summaries, start, k.stride(0), k.stride(1), summaries.stride(0), summaries.stride(1),
            D=d, KERNEL=kernel, STRIDE=stride, BLOCK_K=triton.next_power_of_2(kernel),
            BLOCK_D=triton.next_power_of_2(d),
        )
