"""The KV cache: one preallocated, contiguous buffer per layer, shared by dense and sparse attention."""

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        self.max_len = max_len
        self.k = torch.empty(num_layers, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)  # [layers, Hkv, max_len, d]
        self.v = torch.empty_like(self.k)  # [layers, Hkv, max_len, d]
        self.length = 0  # tokens whose keys and values are stored

    def append(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [Hkv, T, d] at positions start..start+T-1 of one layer."""
        end = start + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (rolled-back drafts, a new turn that diverges, /reset)."""
        self.length = min(self.length, length)
