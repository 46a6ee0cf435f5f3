"""Throughput measurement for `infer bench`: random weights at named real shapes, prefill (pp) and decode (tg) rows;
with --attention, one attention layer: torch SDPA vs our block-sparse kernels (and FlexAttention), plus kernel checks."""

import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from infer.kernels import block_select, pool_keys, sparse_attention, sparse_decode

from ..attention import uses_sparse
from ..config import ModelConfig, SparseConfig
from ..cuda_graph import GraphedDecode
from ..device import synchronize
from ..errors import InferError
from ..generate import PREFILL_CHUNK
from ..kv_cache import KVCache, Positions
from ..model import Transformer, prefill

# Real model shapes (config.json subsets); the weights are random, the cost is the real one.
NAMED_SHAPES = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      max_position_embeddings=131072),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                       max_position_embeddings=131072),
    "minicpm4-8b": dict(model_type="minicpm", vocab_size=73448, hidden_size=4096, intermediate_size=16384,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=2, rope_theta=10000.0,
                        max_position_embeddings=131072, scale_emb=12, scale_depth=1.4, dim_model_base=256),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}


@dataclass
class BenchRow:
    test: str  # "pp512", "tg128"
    depth: int  # tokens already in the cache
    seconds: float
    tokens: int
    bytes_per_token: float = 0.0  # weights + KV read per decoded token (tg rows)
    extra_bytes: int = 0  # CUDA: peak memory allocated beyond the weights, the KV cache and its summaries

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds


def random_model(name: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    if name not in NAMED_SHAPES:
        raise InferError(f"unknown shape {name!r}; known: {', '.join(NAMED_SHAPES)}")
    cfg = ModelConfig.from_dict(NAMED_SHAPES[name])
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of the weights
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    model.setup(device)
    return model


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), the roofline's denominator."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * src.numel() * repeats / (time.perf_counter() - start)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights a decoded token reads: every parameter (tied ones once), but one embedding row."""
    embed = model.embed_tokens.weight
    return tensor_bytes(model.parameters()) - tensor_bytes([embed]) + embed.shape[1] * embed.element_size()


def reset_peak_memory(model: Transformer) -> None:
    device = model.embed_tokens.weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def extra_memory(model: Transformer, cache: KVCache) -> int:
    """Peak CUDA memory allocated so far beyond the weights, the KV cache and its summaries (0 off CUDA)."""
    if not cache.k.is_cuda:
        return 0
    fixed = tensor_bytes(model.parameters())  # tied parameters once
    fixed += tensor_bytes(t for t in (cache.k, cache.v, cache.summaries) if t is not None)
    return torch.cuda.max_memory_allocated(cache.k.device) - fixed


def run_prefill(model: Transformer, length: int, sparse: SparseConfig | None = None, repeats: int = 2,
                graphs: bool = True) -> BenchRow:
    """Prefill `length` random tokens in the engine's chunks (the time to the first token's logits)."""
    reset_peak_memory(model)
    cache = model.new_cache(length + 1, sparse)
    decode = GraphedDecode(model, cache, graphs)  # a sparse prompt's last position runs alone, as in the engine
    tokens = torch.randint(0, model.cfg.vocab_size, (length,)).tolist()
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        synchronize(cache.k.device)
        start = time.perf_counter()
        prefill(model, cache, [], tokens, 0, PREFILL_CHUNK, decode=decode)
        synchronize(cache.k.device)
        best = min(best, time.perf_counter() - start)
    return BenchRow(f"pp{length}", 0, best, length, extra_bytes=extra_memory(model, cache))


def decode_at_depth(model: Transformer, depth: int, room: int, sparse: SparseConfig | None = None,
                    graphs: bool = True) -> tuple[KVCache, GraphedDecode]:
    """A cache holding `depth` random keys and values (pooled when sparse) with room for `room` more, and its
    decode step."""
    cache = model.new_cache(depth + room, sparse)
    cache.k[:, :, :depth].normal_()
    cache.v[:, :, :depth].normal_()
    if sparse is not None:
        written = Positions.of(0, torch.arange(depth, device=cache.k.device))
        count = pool_keys.num_summaries(depth, sparse.kernel_size, sparse.kernel_stride)
        for layer in range(model.cfg.num_layers):
            if sparse.use_nope:
                cache.pool_nope(layer, written)
            elif cache.k.is_cuda:
                pool_keys.pool_keys(cache.k[layer], cache.summaries[layer], 0, count, sparse.kernel_size,
                                    sparse.kernel_stride)
            elif count:
                cache.summaries[layer, :, :count] = pool_keys.reference(cache.k[layer], 0, count, sparse.kernel_size,
                                                                        sparse.kernel_stride)
    return cache, GraphedDecode(model, cache, graphs)


def run_decode(model: Transformer, steps: int, depth: int, sparse: SparseConfig | None = None, graphs: bool = True,
               width: int = 1) -> BenchRow:
    """`steps` forward passes of `width` tokens after `depth` cached positions (random keys and values, pooled
    when sparse), each pass feeding the argmax of the last (no host sync between passes; the engine reads each
    token back while the next pass runs). width 1 is plain decoding ("tgN" rows); width k+1 is the verification
    of k drafts ("vN" rows: passes per second, all drafts accepted)."""
    reset_peak_memory(model)
    cache, step = decode_at_depth(model, depth, steps * width + 16, sparse, graphs)
    tokens = torch.zeros(width, dtype=torch.long, device=cache.k.device)
    for _ in range(3):  # warm up (and capture)
        cache.length = depth
        step(tokens)
    cache.length = depth
    synchronize(cache.k.device)
    start = time.perf_counter()
    for _ in range(steps):  # width 1 feeds the argmax as greedy decoding does: inside the graph
        logits = step(tokens)  # [width, V]
        tokens = step.greedy_next if width == 1 and step.enabled else logits.argmax(-1)
    synchronize(cache.k.device)
    seconds = time.perf_counter() - start
    kv_bytes = 2 * cache.k[:, :, : depth + steps * width // 2].numel() * cache.k.element_size()
    if sparse is not None and uses_sparse(cache, depth + 1):  # the selected blocks, and every summary for scoring
        kv_bytes = kv_bytes * min(1.0, sparse.topk * sparse.block_size / (depth + 1)) + kv_bytes / (2 * sparse.kernel_stride)
    test = f"tg{steps}" if width == 1 else f"v{width}"
    return BenchRow(test, depth, seconds, steps, weight_bytes(model) + kv_bytes, extra_memory(model, cache))


# --- `infer bench --attention`: one attention layer, dense torch SDPA vs our block-sparse kernels (CUDA) ---

DECODE_Q_TILE = 16  # the engine's q_tile for decode (all queries in one tile)


@dataclass
class AttentionRow:
    """One layer at one context length n; times are medians, `ours` includes block selection unless noted."""

    context: int
    prefill_sdpa_ms: float  # torch SDPA, causal, whole prefill in one call
    prefill_ours_ms: float  # our chunked prefill: pool + score + select + sparse attention
    prefill_select_ms: float  # the same loop without the attention: pool + score + select
    sparse_ours_ms: float  # sparse attention alone, one call over all n queries, on a fixed selection
    sparse_flex_ms: float  # FlexAttention on the same selection (nan: flex failed)
    flex_rel_err: float  # ||flex - ours|| / ||ours|| on that selection: ~1e-3 when the masks agree
    mean_blocks: float  # selected blocks per (kv head, query tile), mean
    decode_sdpa_us: float  # one query at n-1 over n keys
    decode_ours_us: float  # score + select + split-K sparse decode
    decode_sdpa_graph_us: float  # the same, replayed from a CUDA graph (no launch overhead; nan: capture failed)
    decode_ours_graph_us: float
    summary_bytes: int  # pooled key summaries of n keys, one layer
    k_bytes: int  # K cache of n keys, one layer
    prefill_peak_bytes: int  # peak memory our prefill loop allocates beyond q, k, v, summaries and the output


@dataclass
class CheckResult:
    name: str
    detail: str
    passed: bool


def attention_inputs(n: int, heads: int, kv_heads: int, head_dim: int, dtype, device, seed: int = 0):
    """Random q [heads, n, d] and k, v [kv_heads, n, d]."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(heads, n, head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(kv_heads, n, head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(kv_heads, n, head_dim, generator=g, device=device, dtype=dtype)
    return q, k, v


def new_summaries(k: torch.Tensor, s: SparseConfig) -> torch.Tensor:
    """An unwritten summary buffer [Hkv, C, d] for the keys k [Hkv, n, d]."""
    n_sum = max(1, pool_keys.num_summaries(k.shape[1], s.kernel_size, s.kernel_stride))
    return torch.empty(k.shape[0], n_sum, k.shape[2], dtype=k.dtype, device=k.device)


def select_chunk(q: torch.Tensor, summaries: torch.Tensor, start: int, s: SparseConfig):
    """The engine's prefill selection (q_tile = block_size) for q [Hq, T, d] at positions start..start+T-1."""
    return block_select.block_select(q, summaries, start, s.kernel_size, s.kernel_stride, s.block_size, s.block_size,
                                     s.topk, s.init_blocks, s.window_size)


def sparse_prefill(q, k, v, summaries, out, s: SparseConfig, chunk: int, attend: bool = True) -> torch.Tensor:
    """Our causal prefill of one layer, in query chunks as the engine runs it: pool the windows each chunk completes,
    score and select blocks, attend. q [Hq, n, d], k, v [Hkv, n, d]; writes out [Hq, n, d]."""
    n = q.shape[1]
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        first, last = (pool_keys.num_summaries(x, s.kernel_size, s.kernel_stride) for x in (start, end))
        pool_keys.pool_keys(k, summaries, first, last, s.kernel_size, s.kernel_stride)
        idx, cnt = select_chunk(q[:, start:end], summaries, start, s)
        if attend:
            sparse_attention.sparse_attention(q[:, start:end], k, v, start, idx, cnt, q_tile=s.block_size,
                                              block_size=s.block_size, out=out[:, start:end])
    return out


def select_all(q, summaries, s: SparseConfig, chunk: int):
    """The selection of sparse_prefill (summaries of all keys written), tiles of all chunks concatenated:
    (block_idx [Hkv, n_tiles, max_sel], block_count [Hkv, n_tiles])."""
    assert chunk % s.block_size == 0
    parts = [select_chunk(q[:, a:a + chunk], summaries, a, s) for a in range(0, q.shape[1], chunk)]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def decode_select(q, summaries, L: int, s: SparseConfig, start: torch.Tensor | None = None):
    """The engine's decode selection for q [Hq, T, d] at positions L-T..L-1: one tile. start: L-T in a device
    int32 [1] tensor, as the engine passes it (the selection then sized to the capacity L), else an int."""
    return block_select.block_select(q, summaries, L - q.shape[1] if start is None else start, s.kernel_size,
                                     s.kernel_stride, s.block_size, DECODE_Q_TILE, s.topk, s.init_blocks,
                                     s.window_size, max_len=L)


def sparse_decode_step(q, k, v, summaries, s: SparseConfig):
    """Our decode attention of q [Hq, T, d] at positions L-T..L-1 over the L = k.shape[1] keys (select, attend), as
    the engine calls it: the positions in device tensors, made here once, so the returned step launches only the
    selection and attention kernels."""
    T, L = q.shape[1], k.shape[1]
    start = torch.full((1,), L - T, dtype=torch.int32, device=q.device)
    length = start + T

    def step() -> torch.Tensor:
        idx, cnt = decode_select(q, summaries, L, s, start)
        return sparse_decode.sparse_decode(q, k, v, length, idx, cnt, block_size=s.block_size)

    return step


def selection_mask(block_idx, block_count, n_blocks: int) -> torch.Tensor:
    """Selected blocks as a dense mask [Hkv, n_tiles, n_blocks] (bool)."""
    valid = torch.arange(block_idx.shape[2], device=block_idx.device) < block_count[..., None]
    cols = torch.where(valid, block_idx, n_blocks).long()  # padding -> a spare column
    sel = torch.zeros(*block_idx.shape[:2], n_blocks + 1, dtype=torch.bool, device=block_idx.device)
    return sel.scatter_(2, cols, True)[..., :n_blocks]


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_block_mask(block_idx, block_count, n: int, group: int, block_size: int):
    """FlexAttention BlockMask of the same selection, for queries 0..n-1 with q_tile == block_size: each tile's
    diagonal block is partial (causal mask_mod), its other selected blocks are full. Heads expanded to Hkv*group."""
    from torch.nn.attention.flex_attention import BlockMask

    n_blocks = triton.cdiv(n, block_size)
    sel = selection_mask(block_idx, block_count, n_blocks)  # [Hkv, n_tiles, n_blocks]
    dev = sel.device
    diag = torch.arange(n_blocks, device=dev)[None, :] == torch.arange(sel.shape[1], device=dev)[:, None]

    def ordered(m):  # ([1, Hq, n_tiles] counts, [1, Hq, n_tiles, n_blocks] ids, chosen ones first) int32
        count = m.sum(-1, dtype=torch.int32)
        ids = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return count.repeat_interleave(group, 0)[None], ids.repeat_interleave(group, 0)[None]

    return BlockMask.from_kv_blocks(*ordered(sel & diag), *ordered(sel & ~diag), BLOCK_SIZE=block_size,
                                    mask_mod=_causal)


_flex_compiled = None


def flex_sparse(q, k, v, block_mask, block_size: int, compiled: bool = True) -> torch.Tensor:
    """flex_attention of q [Hq, n, d] over k, v [Hkv, n, d] under block_mask (GQA), tiles of block_size."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if compiled and _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    fn = _flex_compiled if compiled else flex_attention
    opts = {"BLOCK_M": block_size, "BLOCK_N": block_size} if compiled else None  # tiles must divide the mask's blocks
    return fn(q[None], k[None], v[None], block_mask=block_mask, enable_gqa=True, kernel_options=opts)[0]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in fp32."""
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm()).item()


def _ms(fn, rep: int = 200) -> float:
    return triton.testing.do_bench(fn, warmup=max(25, rep // 4), rep=rep, return_mode="median")


def _graph_ms(fn) -> float:
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:  # report the eager number only
        print(f"infer: warning: CUDA graph timing failed: {type(e).__name__}: {str(e)[:1500]}", file=sys.stderr)
        return math.nan


def attention_row(n: int, s: SparseConfig | None = None, chunk: int = 16384, heads: int = 32, kv_heads: int = 8,
                  head_dim: int = 128, dtype=torch.bfloat16, device="cuda") -> AttentionRow:
    """Measure one attention layer at context n (random q, k, v): prefill, sparse part vs flex, decode, memory."""
    s = s or SparseConfig()
    B = s.block_size
    if n % B or chunk % B:
        raise InferError(f"context and chunk must be multiples of the block size {B}")
    q, k, v = attention_inputs(n, heads, kv_heads, head_dim, dtype, device)
    summaries = new_summaries(k, s)
    out = torch.empty_like(q)
    with torch.inference_mode():
        # 1. Whole causal prefill.
        sdpa_prefill = _ms(lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                                  enable_gqa=True), rep=1000)
        ours_prefill = _ms(lambda: sparse_prefill(q, k, v, summaries, out, s, chunk), rep=1000)
        ours_select = _ms(lambda: sparse_prefill(q, k, v, summaries, out, s, chunk, attend=False), rep=1000)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sparse_prefill(q, k, v, summaries, out, s, chunk)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base

        # 2. Sparse attention alone on one fixed selection (ours from the real inputs), vs FlexAttention.
        idx, cnt = select_all(q, summaries, s, chunk)
        ours_sparse = _ms(lambda: sparse_attention.sparse_attention(q, k, v, 0, idx, cnt, q_tile=B, block_size=B,
                                                                    out=out), rep=500)
        sparse_attention.sparse_attention(q, k, v, 0, idx, cnt, q_tile=B, block_size=B, out=out)
        flex_ms = flex_err = math.nan
        try:
            mask = flex_block_mask(idx, cnt, n, heads // kv_heads, B)
            flex_err = rel_err(flex_sparse(q, k, v, mask, B), out)
            flex_ms = _ms(lambda: flex_sparse(q, k, v, mask, B), rep=500)
            del mask
        except Exception as e:  # keep the other numbers
            print(f"infer: warning: FlexAttention failed: {type(e).__name__}: {str(e)[:1500]}", file=sys.stderr)

        # 3. Decode: one query at position n-1 over n keys.
        q1 = q[:, -1:].contiguous()
        sdpa_decode = lambda: F.scaled_dot_product_attention(q1[None], k[None], v[None], enable_gqa=True)
        ours_decode = sparse_decode_step(q1, k, v, summaries, s)
        row = AttentionRow(
            context=n, prefill_sdpa_ms=sdpa_prefill, prefill_ours_ms=ours_prefill, prefill_select_ms=ours_select,
            sparse_ours_ms=ours_sparse, sparse_flex_ms=flex_ms, flex_rel_err=flex_err,
            mean_blocks=cnt.float().mean().item(),
            decode_sdpa_us=1000 * _ms(sdpa_decode), decode_ours_us=1000 * _ms(ours_decode),
            decode_sdpa_graph_us=1000 * _graph_ms(sdpa_decode), decode_ours_graph_us=1000 * _graph_ms(ours_decode),
            summary_bytes=pool_keys.num_summaries(n, s.kernel_size, s.kernel_stride) * kv_heads * head_dim
            * summaries.element_size(),
            k_bytes=k.numel() * k.element_size(), prefill_peak_bytes=peak,
        )
    del q, k, v, summaries, out, idx, cnt
    torch.cuda.empty_cache()
    return row


def attention_checks(L: int = 8192, heads: int = 32, kv_heads: int = 8, head_dim: int = 128, dtype=torch.bfloat16,
                     device="cuda", s: SparseConfig | None = None, chunk: int | None = None) -> list[CheckResult]:
    """Each Triton kernel vs its torch reference (and dense SDPA) on random inputs with L keys."""
    s = s or SparseConfig()
    B, ks, st = s.block_size, s.kernel_size, s.kernel_stride
    chunk = chunk or L // 4
    T = L // 8  # queries of the chunked-prefill checks, at positions L-T..L-1
    results = []

    def check(name, detail, passed):
        results.append(CheckResult(name, detail, bool(passed)))

    q, k, v = attention_inputs(L, heads, kv_heads, head_dim, dtype, device)
    with torch.inference_mode():
        # pool_keys, in two calls as the engine's chunks do.
        C = pool_keys.num_summaries(L, ks, st)
        summaries = new_summaries(k, s)
        pool_keys.pool_keys(k, summaries, 0, C // 3, ks, st)
        pool_keys.pool_keys(k, summaries, C // 3, C, ks, st)
        ref = pool_keys.reference(k, 0, C, ks, st)
        err = rel_err(summaries[:, :C], ref)
        exact = (summaries[:, :C] == ref).float().mean().item()
        check("pool_keys", f"rel err {err:.1e}, {100 * exact:.2f}% bit-exact", err < 1e-3)

        # block_scores vs reference_scores, and the selections they give: a prefill chunk and a decode step.
        for label, qs, q_tile in (("prefill chunk", q[:, L - T:], B), ("decode", q[:, -1:].contiguous(), DECODE_Q_TILE)):
            Tq = qs.shape[1]
            ref = block_select.reference_scores(qs, summaries, L - Tq, ks, st, B, q_tile)
            got = torch.empty_like(ref)
            gi, gc = block_select.block_select(qs, summaries, L - Tq, ks, st, B, q_tile, s.topk, s.init_blocks,
                                               s.window_size, scores=got)
            fin = ref.isfinite()
            same_support = torch.equal(got.isfinite(), fin)
            err = rel_err(got[fin], ref[fin]) if same_support else math.inf
            ri, rc = block_select.select_blocks(ref, L - Tq, Tq, B, q_tile, s.topk, s.init_blocks, s.window_size)
            n_blocks = got.shape[2]
            gm, rm = selection_mask(gi, gc, n_blocks), selection_mask(ri, rc, n_blocks)
            overlap = ((gm & rm).sum() / rm.sum()).item()
            check(f"block_scores ({label}, {Tq} queries)",
                  f"rel err {err:.1e}, same scored blocks: {same_support}, selection overlap {100 * overlap:.2f}%, "
                  f"same counts: {torch.equal(gc, rc)}", same_support and err < 1e-3 and overlap >= 0.95)
        del got, ref, fin, gm, rm

        # sparse_attention vs its reference, on the selector's choice for the last T queries.
        qs = q[:, L - T:]
        idx, cnt = select_chunk(qs, summaries, L - T, s)
        out = sparse_attention.sparse_attention(qs, k, v, L - T, idx, cnt, q_tile=B, block_size=B)
        err = rel_err(out, sparse_attention.reference(qs, k, v, L - T, idx, cnt, q_tile=B, block_size=B))
        check(f"sparse_attention ({T} queries at {L - T}, {cnt.float().mean().item():.1f} blocks/tile)",
              f"rel err {err:.1e}", err < 1e-2)

        # Every causal block selected == dense causal SDPA, all L queries in one call.
        n_blocks = L // B
        all_idx = torch.arange(n_blocks, dtype=torch.int32, device=device).expand(kv_heads, n_blocks, n_blocks)
        all_cnt = torch.arange(1, n_blocks + 1, dtype=torch.int32, device=device).expand(kv_heads, n_blocks)
        out = sparse_attention.sparse_attention(q, k, v, 0, all_idx.contiguous(), all_cnt.contiguous(), q_tile=B,
                                                block_size=B)
        sdpa = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
        err = rel_err(out, sdpa)
        check(f"sparse_attention, all blocks == SDPA causal ({L} queries)", f"rel err {err:.1e}", err < 1e-2)

        # The benchmark's chunked prefill loop == one call on the concatenated selection (the flex mask).
        fresh = new_summaries(k, s)
        looped = sparse_prefill(q, k, v, fresh, torch.empty_like(q), s, chunk)
        idx, cnt = select_all(q, fresh, s, chunk)
        err = rel_err(looped, sparse_attention.sparse_attention(q, k, v, 0, idx, cnt, q_tile=B, block_size=B))
        check(f"prefill loop ({chunk}-query chunks) == one call on its selection", f"rel err {err:.1e}", err < 1e-3)
        del out, sdpa, looped

        # sparse_decode vs its reference (selector's choice), and with every block == SDPA.
        for Tq in (1, 4):
            qd = q[:, L - Tq:].contiguous()
            idx, cnt = decode_select(qd, summaries, L, s)
            out = sparse_decode_step(qd, k, v, summaries, s)()  # the step the bench times: positions on the device
            err = rel_err(out, sparse_decode.reference(qd, k, v, L, idx, cnt, block_size=B))
            check(f"sparse decode step ({Tq} queries, {cnt.float().mean().item():.1f} blocks)", f"rel err {err:.1e}",
                  err < 1e-2)
            all_idx = torch.arange(n_blocks, dtype=torch.int32, device=device).expand(kv_heads, 1, n_blocks)
            all_cnt = torch.full((kv_heads, 1), n_blocks, dtype=torch.int32, device=device)
            out = sparse_decode.sparse_decode(qd, k, v, L, all_idx.contiguous(), all_cnt, block_size=B)
            mask = torch.arange(L, device=device)[None, :] <= torch.arange(L - Tq, L, device=device)[:, None]
            sdpa = F.scaled_dot_product_attention(qd[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]
            err = rel_err(out, sdpa)
            check(f"sparse_decode, all blocks == SDPA ({Tq} queries)", f"rel err {err:.1e}", err < 1e-2)
    return results
