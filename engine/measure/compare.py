"""The comparisons the kernel checks and the tests share: relative error, and dense causal attention as the
reference of the block kernels. Plain torch, importing no kernel module (the GPU tests import it at collection)."""

import torch
import torch.nn.functional as F


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in fp32."""
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm()).item()


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
    """Dense causal attention (torch SDPA) of q [Hq, T, d] at positions q_start.. over the keys k, v [Hkv, >= L, d]
    0..L-1, L = q_start + T (bottom-right aligned): the reference the block kernels must equal with every block."""
    L = q_start + q.shape[1]
    mask = torch.arange(L, device=q.device)[None, :] <= torch.arange(q_start, L, device=q.device)[:, None]  # [T, L]
    return F.scaled_dot_product_attention(q[None], k[None, :, :L], v[None, :, :L], attn_mask=mask,
                                          enable_gqa=True)[0]
