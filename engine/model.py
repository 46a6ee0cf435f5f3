"""One decoder-only Transformer for every supported architecture, driven by ModelConfig.

Parameter names equal the Hugging Face checkpoint names without the leading "model.", so weights load by name.
"""

import torch
import torch.distributed as dist
from torch import nn

from infer.kernels import gemv, norm

from .attention import SelectionRecord, attend, pass_context, uses_sparse
from .config import ModelConfig, SparseConfig
from .kv_cache import KVCache, Positions
from .linear import Embedding, Linear
from .parallel import FORWARD, Parallel
from .rope import Rope, rope_append


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (norm.rms_norm if x.is_cuda else norm.reference)(x, self.weight, self.eps)  # [T, dim]

    def before(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """(this norm of x, and where `layer` (a Linear or Concat) rounds its input for integer dot products, the
        norm's output rounded as quant.round_x rounds it, written by the same launch; else None)."""
        if layer.rounds(x):
            return norm.rms_norm(x, self.weight, self.eps, round_x=True)
        return self(x), None


class Attention(nn.Module):
    """Parameters as in the checkpoint (q_proj, k_proj, v_proj); `fuse` joins the three into qkv_proj. Under tensor
    parallelism this rank holds its share of the KV heads with their query heads (q/k/v split by rows, o by
    columns)."""

    def __init__(self, cfg: ModelConfig, parallel: Parallel | None = None):
        super().__init__()
        d, bias = cfg.head_dim, cfg.attention_bias
        size = parallel.size if parallel else 1
        if parallel:
            parallel.split(cfg.num_kv_heads, "key-value heads")
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads // size, cfg.num_kv_heads // size, d
        rows = dict(parallel=parallel, split=0)
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * d, bias=bias, **rows)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=bias, **rows)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=bias, **rows)
        self.o_proj = Linear(cfg.num_heads * d, cfg.hidden_size, parallel=parallel, split=1)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def fuse(self) -> None:
        self.qkv_proj = Linear.fused(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, h: torch.Tensor, pre_norm: RMSNorm, residual_scale: float, pos: Positions,
                rope: tuple[torch.Tensor, float], cache: KVCache, layer: int,
                record: SelectionRecord | None = None) -> torch.Tensor:
        """The residual stream h [T, hidden] plus residual_scale * attention(pre_norm(h)); record: see attend."""
        num_tokens = h.shape[0]
        x, rounded = pre_norm.before(self.qkv_proj, h)
        qkv = self.qkv_proj(x, rounded=rounded)  # [T, (Hq + 2 Hkv) d]
        qk_norms = {} if self.q_norm is None else dict(
            q_norm_weight=self.q_norm.weight, k_norm_weight=self.k_norm.weight, eps=self.q_norm.eps)
        # q [Hq, T, d] rotated; k rotated and v written into the cache at pos, and the summaries of the windows they
        # complete (use_nope summaries pool the keys before RoPE: cache.pool_nope)
        sparse = cache.sparse
        pool = {} if sparse is None or sparse.use_nope else dict(
            summaries=cache.summaries[layer], kernel=sparse.kernel_size, stride=sparse.kernel_stride)
        q = rope_append(qkv, pos.ids, *rope, cache.k[layer], cache.v[layer], self.num_heads, self.num_kv_heads,
                        self.head_dim, **qk_norms, **pool)
        q_score = None
        if sparse is not None and sparse.use_nope:  # blocks are scored with the queries before RoPE
            cache.pool_nope(layer, pos)
            q_score = qkv[:, :self.num_heads * self.head_dim].reshape(num_tokens * self.num_heads, self.head_dim)
            if self.q_norm is not None:
                q_score = self.q_norm(q_score)
            q_score = q_score.view(num_tokens, self.num_heads, self.head_dim).transpose(0, 1)  # [Hq, T, d]
        out = attend(q, cache, layer, pos, q_score, record)  # [Hq, T, d]
        return self.o_proj(out.transpose(0, 1).reshape(num_tokens, -1), residual=h, residual_scale=residual_scale)


class MLP(nn.Module):
    """Parameters as in the checkpoint (gate_proj, up_proj, down_proj); `fuse` joins gate and up into gate_up_proj.
    Under tensor parallelism this rank holds a slice of the intermediate features (gate/up rows, down columns)."""

    def __init__(self, cfg: ModelConfig, parallel: Parallel | None = None):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, parallel=parallel, split=0)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, parallel=parallel, split=0)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, parallel=parallel, split=1)

    def fuse(self) -> None:
        self.gate_up_proj = Linear.fused(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, h: torch.Tensor, pre_norm: RMSNorm, residual_scale: float) -> torch.Tensor:
        """The residual stream h [T, hidden] plus residual_scale * down(silu(gate) * up) of pre_norm(h)."""
        x, rounded = pre_norm.before(self.gate_up_proj, h)
        gate_up = self.gate_up_proj(x, rounded=rounded)  # [T, 2 * intermediate]
        return self.down_proj(gate_up, gated=True, residual=h, residual_scale=residual_scale)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: Parallel | None = None):
        super().__init__()
        self.self_attn = Attention(cfg, parallel)
        self.mlp = MLP(cfg, parallel)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.residual_scale = cfg.residual_scale

    def forward(self, h: torch.Tensor, pos: Positions, rope: tuple[torch.Tensor, float], cache: KVCache,
                layer: int, record: SelectionRecord | None = None) -> torch.Tensor:
        """The residual stream h [T, hidden] after this layer."""
        h = self.self_attn(h, self.input_layernorm, self.residual_scale, pos, rope, cache, layer, record)
        return self.mlp(h, self.post_attention_layernorm, self.residual_scale)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: Parallel | None = None):
        """parallel: this rank's place in a tensor-parallel group (engine/parallel.py); the model is then its slice,
        the vocabulary split too (the embedding's and the LM head's rows)."""
        super().__init__()
        self.cfg = cfg
        self.parallel = parallel
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, parallel)
        self.layers = nn.ModuleList(DecoderLayer(cfg, parallel) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, parallel=parallel, split=0)
        self.rope: Rope | None = None  # set by `setup` once the weights are on their device
        self.dtype: torch.dtype | None = None  # likewise

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        """Finish construction on `device` once the checkpoint's weights are in (dtype: the activations' and the KV
        cache's): rope tables, tied embeddings, and the q/k/v and gate/up projections fused (one weight read each per
        token)."""
        self.dtype = self.embed_tokens.dtype = dtype
        self.rope = Rope(self.cfg, device)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight, self.lm_head.qtype = self.embed_tokens.weight, self.embed_tokens.qtype
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def new_cache(self, max_len: int, sparse: SparseConfig | None = None) -> KVCache:
        kv_heads = self.layers[0].self_attn.num_kv_heads  # this rank's
        return KVCache(self.cfg.num_layers, kv_heads, max_len, self.cfg.head_dim, self.dtype, self.rope.device,
                       sparse, self.rope)

    def run(self, tokens: torch.Tensor, cache: KVCache, num_logits: int = 1, record: SelectionRecord | None = None):
        """forward, announced first to the followers of a tensor-parallel group (the passes the engine runs outside
        its CUDA graphs: prompt chunks, scoring)."""
        if self.parallel is not None:
            self.parallel.announce(FORWARD, cache, tokens, num_logits)
        return self(tokens, cache, num_logits=num_logits, record=record)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, num_logits: int = 1, pos: Positions | None = None,
                argmax: torch.Tensor | None = None, record: SelectionRecord | None = None) -> torch.Tensor:
        """Run tokens [T] at positions cache.length.. and return logits [num_logits, vocab] (float32) of the last ones.

        pos: those positions (default: made here). A CUDA graph of a decode-sized pass passes its own buffers and
        replays at other positions (see Positions). argmax: a gemv.argmax_buffer that receives the logits' argmax
        (one token on CUDA: greedy decoding without leaving the device). record: receives the last layer's sparse
        selection (stats)."""
        start, num_tokens = cache.length, tokens.shape[0]
        if pos is None:
            pos = Positions.of(start, torch.arange(start, start + num_tokens, device=tokens.device))
        rope = self.rope.scaling(start + num_tokens)
        h = self.embed_tokens(tokens)  # [T, hidden], the residual stream
        if self.cfg.scale_emb != 1.0:
            h = h * self.cfg.scale_emb
        last = len(self.layers) - 1
        with pass_context(num_tokens):
            for i, layer in enumerate(self.layers):
                h = layer(h, pos, rope, cache, i, record if i == last else None)
        cache.length = start + num_tokens
        x, rounded = self.norm.before(self.lm_head, h[-num_logits:])
        logits = self.lm_head(x, argmax=argmax, out_dtype=torch.float32, rounded=rounded)
        logits = logits.float()  # [num_logits, V]: already float32 from the one-row GEMV
        if self.parallel is not None:  # this rank's slice of the vocabulary: the argmax and the logits of all
            if argmax is not None:
                found = argmax != gemv.EMPTY_ARGMAX  # its row indices made the vocabulary's: one max across ranks
                argmax.copy_(self.parallel.all_reduce(torch.where(found, argmax - self.lm_head.shard.start, argmax),
                                                      op=dist.ReduceOp.MAX))
            logits = self.parallel.all_gather_columns(logits)
        return logits if self.cfg.logit_scale == 1.0 else logits * self.cfg.logit_scale


def reusable_prefix(cached: list[int], tokens: list[int]) -> int:
    """How many leading positions of a cache that holds `cached` serve `tokens`: their common prefix, but never all
    of `tokens` (at least one token must run to give logits)."""
    n = min(len(cached), len(tokens) - 1)
    if cached[:n] == tokens[:n]:  # the usual case, compared at C speed
        return n
    return next(i for i in range(n) if cached[i] != tokens[i])


def prefill(model: Transformer, cache: KVCache, cached: list[int], tokens: list[int], keep: int, chunk: int,
            on_progress=None, decode=None) -> torch.Tensor:
    """Bring `cache`, which holds the keys and values of `cached`, to hold those of `tokens`: keep its first `keep`
    positions (see reusable_prefix) and run the rest in chunks of `chunk` tokens, which bounds the activations of a
    long prompt. `cached` is updated in place after each chunk, so it names what the cache holds even when
    interrupted. on_progress(done, total) follows the chunks. Returns the last position's logits [1, V].

    When the last position attends sparsely it runs as a pass of its own, through `decode` (a callable like
    cuda_graph.GraphedDecode; default the model, eagerly): the token sampled from its logits selects its blocks
    alone, as every decoded token does, instead of sharing the selection of a query tile with the queries before
    it."""
    cache.truncate(keep)
    del cached[keep:]
    ids = torch.tensor(tokens, dtype=torch.long, device=cache.k.device)  # [len(tokens)]
    n = len(tokens)
    alone = n - keep > 1 and uses_sparse(cache, n)
    body = n - 1 if alone else n  # the positions that run in chunks
    bounds = [*range(keep, body, chunk), body, *([n] if alone else [])]
    for begin, end in zip(bounds, bounds[1:]):
        if alone and end == n and decode is not None:
            logits = decode(ids[begin:end])
        else:
            logits = model.run(ids[begin:end], cache)
        cached += tokens[begin:end]
        if on_progress:
            on_progress(end - keep, n - keep)
    return logits
