"""Throughput measurement for `infer bench`: random weights at named real shapes, prefill (pp) and decode (tg) rows;
with --attention, one attention layer: torch SDPA vs our block-sparse kernels (and FlexAttention). Under tensor
parallelism every rank builds its slice of the model and times the same rows (engine/parallel.py, unannounced)."""

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from infer.kernels import pool_keys, sparse_attention
from infer.kernels import quant as quant_blocks

from ..attention import uses_sparse
from ..config import ModelConfig, SparseConfig, sparse_config
from ..cuda_graph import GraphedDecode
from ..device import synchronize
from ..errors import InferError
from ..generate import PREFILL_CHUNK
from ..kv_cache import KVCache, Positions
from ..model import Transformer, prefill
from ..parallel import Parallel, check_split, launch, world_size
from ..weights import QUANTIZE, Checkpoint, load_model
from .compare import rel_err
from .layer import attention_inputs, new_summaries, select_all, selection_mask, sparse_decode_step, sparse_prefill

# Real model shapes (config.json subsets); the weights are random, the cost is the real one.
NAMED_SHAPES = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      max_position_embeddings=131072),
    "llama3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0,
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


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v and ffn_down a Q4_K_M file keeps in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def q4_k_m(kind: str, layer: int, layers: int, cols: int) -> str:
    """The GGML type llama-quantize gives a tensor of `cols` columns in a Q4_K_M file (dense models): `kind` is the
    GGUF tensor kind (attn_q, attn_v, ffn_down, output, token_embd, ...). Rows that are not whole 256-element
    blocks fall back as llama.cpp's do (Q4_K to Q5_0, Q6_K to Q8_0)."""
    wide = kind == "output" or (kind in ("attn_v", "ffn_down") and _more_bits(layer, layers))
    if cols % 256:
        return "Q8_0" if wide else "Q5_0"
    return "Q6_K" if wide else "Q4_K"


# --quant: the GGML type of each matrix of a random model: (kind, layer, layers, cols) -> type
QUANT_RECIPES = {
    "q4_k_m": q4_k_m,
    "q8_0": lambda *matrix: "Q8_0",
    **{name: lambda *matrix, qt=qt: qt.name for name, qt in QUANTIZE.items()},  # as --quantize makes them
}
# the model's matrices by GGUF tensor kind
_KINDS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def shape_config(name: str) -> ModelConfig:
    if name not in NAMED_SHAPES:
        raise InferError(f"unknown shape {name!r}; known: {', '.join(NAMED_SHAPES)}")
    return ModelConfig.from_dict(NAMED_SHAPES[name])


def random_model(name: str, device: torch.device, dtype: torch.dtype, quant: str | None = None,
                 parallel: Parallel | None = None) -> Transformer:
    """A model of the named shape with random weights in dtype, or with its matrices in the GGML types of a
    QUANT_RECIPES recipe (random valid blocks: the cost is the real one; on the CPU they are dequantized as a GGUF's
    are, engine/linear.py); this tensor-parallel rank's slice of it with `parallel`."""
    cfg = shape_config(name)
    if quant is not None and quant not in QUANT_RECIPES:
        raise InferError(f"unknown --quant {quant!r}; known: {', '.join(QUANT_RECIPES)}")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg, parallel)  # every weight made below, on the device in its format: no float32 copy
    quantized = {}  # module name -> GGML type
    if quant is not None:
        kinds = {f"layers.{i}.{part}": (kind, i) for i in range(cfg.num_layers) for part, kind in _KINDS.items()}
        kinds.update({"embed_tokens": ("token_embd", 0), "lm_head": ("output", 0)})
        if cfg.tie_word_embeddings:
            del kinds["lm_head"]
        quantized = {module: QUANT_RECIPES[quant](kind, i, cfg.num_layers, model.get_submodule(module).full_shape[1])
                     for module, (kind, i) in kinds.items()}
    for module_name, type_name in quantized.items():
        module = model.get_submodule(module_name)
        rows, cols = module.full_shape  # the whole matrix's blocks, of which load keeps this rank's slice
        module.load(quant_blocks.random_blocks(type_name, rows, cols, device), quant_blocks.quant_type(type_name),
                    device, dtype, packed=device.type == "cuda")
    for name, p in list(model.named_parameters()):  # the rest: norms 1, matrices N(0, 0.02)
        if p.is_meta:
            value = (torch.ones if p.dim() == 1 else torch.empty)(p.shape, device=device, dtype=dtype)
            if p.dim() > 1:
                value.normal_(0.0, 0.02)
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value, requires_grad=False))
    model.setup(device, dtype)
    return model


def file_model(path, device: torch.device, dtype: torch.dtype, parallel: Parallel | None = None) -> Transformer:
    """The model of a checkpoint (a folder or a GGUF file), loaded as the engine loads it (this rank's slice with
    `parallel`)."""
    checkpoint = Checkpoint(path)
    return load_model(checkpoint, checkpoint.config(), device, dtype, progress=False, parallel=parallel)


@dataclass
class Plan:
    """What `infer bench` times: a model (random weights at a named shape, or a checkpoint) and its rows."""

    shape: str
    quant: str | None  # --quant of the random weights
    path: Path | None  # a checkpoint instead of the shape
    dtype: torch.dtype
    sparse: dict  # SparseConfig overrides: the mode, and the summaries' size and stride (None: the model's)
    prompt_tokens: list[int]  # a ppN row each (0: none, as llama-bench's -p 0)
    gen_tokens: int  # tokens of each tg / vN row (0: no such rows)
    depths: list[int]
    widths: list[int]  # 1 (tg rows), then the verification widths (vN rows)
    graphs: bool

    def model(self, device: torch.device, parallel: Parallel | None = None) -> Transformer:
        if self.path is not None:
            return file_model(self.path, device, self.dtype, parallel)
        return random_model(self.shape, device, self.dtype, self.quant, parallel)

    def rows(self, model: Transformer) -> list[BenchRow]:
        sparse = sparse_config(model.cfg.sparse, **self.sparse)
        rows = [run_prefill(model, n, sparse, graphs=self.graphs) for n in self.prompt_tokens if n]
        return rows + [run_decode(model, self.gen_tokens, d, sparse, self.graphs, width)
                       for width in self.widths for d in self.depths if self.gen_tokens]


def bench_group(plan: Plan, device: torch.device, tp: int) -> Parallel | None:
    """The tensor-parallel group of `tp` ranks (world_size) that times the plan, this process its rank 0 (None for
    one rank): every other rank builds its slice and times the same rows, in step with rank 0."""
    size = world_size(tp)
    check_split(size, Checkpoint(plan.path).config() if plan.path is not None else shape_config(plan.shape))
    return launch(size, device, _time_slice, (plan,), announced=False)


def _time_slice(parallel: Parallel, plan: Plan) -> None:
    plan.rows(plan.model(parallel.device, parallel))


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


@functools.cache
def compiled_flex_attention():
    """torch.compile'd flex_attention, compiled once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_sparse(q, k, v, block_mask, block_size: int, compiled: bool = True) -> torch.Tensor:
    """flex_attention of q [Hq, n, d] over k, v [Hkv, n, d] under block_mask (GQA), tiles of block_size."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = compiled_flex_attention() if compiled else flex_attention
    opts = {"BLOCK_M": block_size, "BLOCK_N": block_size} if compiled else None  # tiles must divide the mask's blocks
    return fn(q[None], k[None], v[None], block_mask=block_mask, enable_gqa=True, kernel_options=opts)[0]


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


