"""The KV cache: one preallocated, contiguous buffer per layer, shared by dense and sparse attention.

With sparse attention on, it also keeps the pooled key summaries (InfLLM-V2): summary c is the mean of the keys
in window [c*stride, c*stride + kernel). They are a pure function of the keys before them, so truncating the cache
needs no bookkeeping: the first num_summaries(length) summaries stay valid. With use_nope the summaries pool
the keys before RoPE: the cached (rotated) keys of each new window are rotated back first, so the cache still
holds one copy of the keys.
"""

from dataclasses import dataclass

import torch

from infer.kernels import block_select, pool_keys

from .config import SparseConfig
from .rope import Rope, unapply_rope


@dataclass
class Positions:
    """Where the T tokens of one forward pass sit. `start` (a host int) picks the attention path and sizes the
    prefill launches; on CUDA, decode-sized passes take every position from the device tensors, so a CUDA graph
    captured at one position replays correctly at another."""

    start: int  # = ids[0]
    ids: torch.Tensor  # [T] absolute positions, int64 (int32 in a CUDA graph's pass: then the same as ids32)
    ids32: torch.Tensor  # [T] int32, for the kernels
    ends: torch.Tensor  # [T] int32: the keys visible to each query, ids + 1

    @classmethod
    def of(cls, start: int, ids: torch.Tensor) -> "Positions":
        ids32 = ids.int()
        return cls(start, ids, ids32, ids32 + 1)

    def query(self, i: int) -> "Positions":
        """The positions of query i alone."""
        return Positions(self.start + i, self.ids[i:i + 1], self.ids32[i:i + 1], self.ends[i:i + 1])


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device,
                 sparse: SparseConfig | None = None, rope: Rope | None = None):
        self.max_len = max_len
        self.k = torch.empty(num_layers, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)  # [layers, Hkv, max_len, d]
        self.v = torch.empty_like(self.k)  # [layers, Hkv, max_len, d]
        self.length = 0  # tokens whose keys and values are stored
        self.sparse = sparse  # None: dense attention only, no summaries kept
        self.rope = rope  # the rotation of the cached keys, undone for use_nope summaries
        if sparse is not None and sparse.use_nope and rope is None:
            raise ValueError("use_nope summaries need the model's rope")
        self.summaries = None  # [layers, Hkv, C, d] with sparse attention
        self.select_tickets = None  # the block selection's counters (block_select.new_tickets), on CUDA
        if sparse is not None:
            max_summaries = max(1, pool_keys.num_summaries(max_len, sparse.kernel_size, sparse.kernel_stride))
            self.summaries = torch.empty(num_layers, num_kv_heads, max_summaries, head_dim, dtype=dtype, device=device)  # [layers, Hkv, C, d]
            if self.k.is_cuda:
                self.select_tickets = block_select.new_tickets(self.k.device)

    def pool_nope(self, layer: int, pos: Positions) -> None:
        """use_nope: pool the windows that the keys just written at `pos` complete from the keys before RoPE (one
        layer). Without use_nope, kernels.rope_append pools the rotated keys as it appends them."""
        kernel, stride = self.sparse.kernel_size, self.sparse.kernel_stride
        end = pos.start + pos.ids.shape[0]
        first, last = pool_keys.num_summaries(pos.start, kernel, stride), pool_keys.num_summaries(end, kernel, stride)
        if last <= first:
            return
        lo, hi = first * stride, (last - 1) * stride + kernel  # the keys of the new windows
        cos, sin = self.rope.cos_sin(torch.arange(lo, hi, device=self.k.device), end)  # [hi - lo, d]
        keys = unapply_rope(self.k[layer, :, lo:hi], cos, sin)  # [Hkv, hi - lo, d] fp32, before RoPE
        self.summaries[layer, :, first:last] = pool_keys.reference(keys, 0, last - first, kernel, stride)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (rolled-back drafts, a new turn that diverges, /reset)."""
        self.length = min(self.length, length)
