"""The one attention entry point: every layer's attention over the KV cache goes through `attend`."""

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


def attend(q: torch.Tensor, cache: KVCache, layer: int, start: int) -> torch.Tensor:
    """Causal attention of queries q [Hq, T, d] at positions start..start+T-1 over cached keys 0..start+T-1.

    Returns [Hq, T, d]. Dense torch SDPA; grouped-query heads read their shared K/V without expansion.
    """
    num_q = q.shape[1]
    end = start + num_q
    k = cache.k[layer, :, :end]  # [Hkv, L, d]
    v = cache.v[layer, :, :end]  # [Hkv, L, d]
    mask = None
    if num_q > 1 and start > 0:  # a chunk after cached tokens: bottom-right aligned causal mask
        mask = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]  # [T, L]
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=num_q > 1 and start == 0, enable_gqa=True
    )
    return out[0]
