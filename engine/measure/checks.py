"""`infer bench --attention --check`: each Triton kernel of one attention layer against its torch reference (and
dense SDPA) at the real shape, before anything is timed. The CPU tests run the same checks at small shapes under the
Triton interpreter (tests/test_checks.py)."""

import math
from dataclasses import dataclass

import torch
import triton

from infer.kernels import block_select, pool_keys, sparse_attention, sparse_decode

from ..attention import DECODE_Q_TILE
from ..config import SparseConfig
from .compare import rel_err, sdpa_causal
from .layer import (attention_inputs, decode_select, new_summaries, select_all, select_chunk, selection_mask,
                    sparse_decode_step, sparse_prefill)


@dataclass
class CheckResult:
    name: str
    detail: str
    passed: bool


def check_pool_keys(k: torch.Tensor, s: SparseConfig) -> tuple[CheckResult, torch.Tensor]:
    """pool_keys (in two calls, as the engine's chunks run it) against its reference; returns the summaries."""
    C = pool_keys.num_summaries(k.shape[1], s.kernel_size, s.kernel_stride)
    summaries = new_summaries(k, s)
    pool_keys.pool_keys(k, summaries, 0, C // 3, s.kernel_size, s.kernel_stride)
    pool_keys.pool_keys(k, summaries, C // 3, C, s.kernel_size, s.kernel_stride)
    ref = pool_keys.reference(k, 0, C, s.kernel_size, s.kernel_stride)
    err = rel_err(summaries[:, :C], ref)
    exact = (summaries[:, :C] == ref).float().mean().item()
    return CheckResult("pool_keys", f"rel err {err:.1e}, {100 * exact:.2f}% bit-exact", err < 1e-3), summaries


def check_block_scores(q: torch.Tensor, summaries: torch.Tensor, L: int, s: SparseConfig, q_tile: int,
                       label: str) -> CheckResult:
    """block_select's block scores and selection for q [Hq, T, d] at positions L-T..L-1 against the reference's."""
    T, B = q.shape[1], s.block_size
    geometry = (s.kernel_size, s.kernel_stride, B, q_tile)
    ref = block_select.reference_scores(q, summaries, L - T, *geometry)
    got = torch.empty_like(ref)
    gi, gc = block_select.block_select(q, summaries, L - T, *geometry, s.topk, s.init_blocks, s.window_size,
                                       scores=got, tickets=block_select.new_tickets(q.device))
    fin = ref.isfinite()
    same_support = torch.equal(got.isfinite(), fin)
    err = rel_err(got[fin], ref[fin]) if same_support else math.inf
    ri, rc = block_select.select_blocks(ref, L - T, T, B, q_tile, s.topk, s.init_blocks, s.window_size)
    gm, rm = selection_mask(gi, gc, got.shape[2]), selection_mask(ri, rc, got.shape[2])
    overlap = ((gm & rm).sum() / rm.sum()).item()
    return CheckResult(f"block_scores ({label}, {T} queries)",
                       f"rel err {err:.1e}, same scored blocks: {same_support}, selection overlap "
                       f"{100 * overlap:.2f}%, same counts: {torch.equal(gc, rc)}",
                       same_support and err < 1e-3 and overlap >= 0.95)


def check_sparse_attention(q, k, v, summaries, L: int, s: SparseConfig) -> CheckResult:
    """sparse_attention against its reference, on the selector's choice for q [Hq, T, d] at L-T..L-1."""
    T, B = q.shape[1], s.block_size
    idx, cnt = select_chunk(q, summaries, L - T, s)
    out = sparse_attention.sparse_attention(q, k, v, L - T, idx, cnt, q_tile=B, block_size=B)
    err = rel_err(out, sparse_attention.reference(q, k, v, L - T, idx, cnt, q_tile=B, block_size=B))
    return CheckResult(f"sparse_attention ({T} queries at {L - T}, {cnt.float().mean().item():.1f} blocks/tile)",
                       f"rel err {err:.1e}", err < 1e-2)


def check_sparse_attention_all_blocks(q, k, v, s: SparseConfig) -> CheckResult:
    """Every block selected (the causal mask trims them) == dense causal SDPA, all queries in one call."""
    L, B = q.shape[1], s.block_size
    idx, cnt = sparse_attention.every_block(k.shape[0], triton.cdiv(L, B), L, B, q.device)
    out = sparse_attention.sparse_attention(q, k, v, 0, idx, cnt, q_tile=B, block_size=B)
    err = rel_err(out, sdpa_causal(q, k, v, 0))
    return CheckResult(f"sparse_attention, all blocks == SDPA causal ({L} queries)", f"rel err {err:.1e}", err < 1e-2)


def check_prefill_loop(q, k, v, s: SparseConfig, chunk: int) -> CheckResult:
    """The benchmark's chunked prefill loop == one call on the concatenated selection (FlexAttention's mask)."""
    summaries = new_summaries(k, s)
    looped = sparse_prefill(q, k, v, summaries, torch.empty_like(q), s, chunk)
    idx, cnt = select_all(q, summaries, s, chunk)
    one_call = sparse_attention.sparse_attention(q, k, v, 0, idx, cnt, q_tile=s.block_size, block_size=s.block_size)
    err = rel_err(looped, one_call)
    return CheckResult(f"prefill loop ({chunk}-query chunks) == one call on its selection", f"rel err {err:.1e}",
                       err < 1e-3)


def check_decode_step(q, k, v, summaries, s: SparseConfig) -> CheckResult:
    """The decode step the bench times (selection, split-K attention; positions on the device) for q [Hq, T, d] at
    L-T..L-1 against sparse_decode's reference on the same selection."""
    T, L = q.shape[1], k.shape[1]
    idx, cnt = decode_select(q, summaries, L, s, tickets=block_select.new_tickets(q.device))
    out = sparse_decode_step(q, k, v, summaries, s)()
    err = rel_err(out, sparse_decode.reference(q, k, v, L, idx, cnt, block_size=s.block_size))
    return CheckResult(f"sparse decode step ({T} queries, {cnt.float().mean().item():.1f} blocks)",
                       f"rel err {err:.1e}", err < 1e-2)


def check_decode_all_blocks(q, k, v, s: SparseConfig) -> CheckResult:
    """sparse_decode with every block selected == dense SDPA, for q [Hq, T, d] at L-T..L-1."""
    T, L = q.shape[1], k.shape[1]
    idx, cnt = sparse_attention.every_block(k.shape[0], 1, L, s.block_size, q.device)
    out = sparse_decode.sparse_decode(q, k, v, L, idx, cnt, block_size=s.block_size)
    err = rel_err(out, sdpa_causal(q, k, v, L - T))
    return CheckResult(f"sparse_decode, all blocks == SDPA ({T} queries)", f"rel err {err:.1e}", err < 1e-2)


def attention_checks(L: int = 8192, heads: int = 32, kv_heads: int = 8, head_dim: int = 128, dtype=torch.bfloat16,
                     device="cuda", s: SparseConfig | None = None, chunk: int | None = None) -> list[CheckResult]:
    """Each kernel of one attention layer against its torch reference (and dense SDPA) on random inputs with L keys:
    prefill chunks of T = L/8 queries, decode steps of 1 and 4 queries."""
    s = s or SparseConfig()
    chunk = chunk or L // 4
    T = L // 8
    q, k, v = attention_inputs(L, heads, kv_heads, head_dim, dtype, device)
    with torch.inference_mode():
        pooled, summaries = check_pool_keys(k, s)
        results = [pooled]
        results += [check_block_scores(q[:, L - T:], summaries, L, s, s.block_size, "prefill chunk"),
                    check_block_scores(q[:, -1:].contiguous(), summaries, L, s, DECODE_Q_TILE, "decode"),
                    check_sparse_attention(q[:, L - T:], k, v, summaries, L, s),
                    check_sparse_attention_all_blocks(q, k, v, s),
                    check_prefill_loop(q, k, v, s, chunk)]
        for queries in (1, 4):
            qd = q[:, L - queries:].contiguous()
            results += [check_decode_step(qd, k, v, summaries, s), check_decode_all_blocks(qd, k, v, s)]
    return results
