"""One decoder-only Transformer for every supported architecture, driven by ModelConfig.

Parameter names equal the Hugging Face checkpoint names without the leading "model.", so weights load by name.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .config import ModelConfig, SparseConfig
from .kv_cache import KVCache
from .rope import Rope, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, bias = cfg.head_dim, cfg.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache, layer: int, start: int) -> torch.Tensor:
        num_tokens = x.shape[0]  # x [T, hidden]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim).transpose(0, 1)  # [Hq, T, d]
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)  # [Hkv, T, d]
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)  # [Hkv, T, d]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q_nope = q if cache.sparse is not None and cache.sparse.use_nope else None  # scores blocks before RoPE
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.append(layer, start, k, v)
        out = attend(q, cache, layer, start, q_nope)  # [Hq, T, d]
        return self.o_proj(out.transpose(0, 1).reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.residual_scale = cfg.residual_scale

    def forward(self, x, cos, sin, cache: KVCache, layer: int, start: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start) * self.residual_scale
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: Rope | None = None  # set by `setup` once the weights are on their device

    def setup(self, device: torch.device) -> None:
        """Finish construction on `device`: rope tables and tied embeddings."""
        self.rope = Rope(self.cfg, device)
        if device.type == "cuda":  # cuDNN SDPA rebuilds its graph for every new length: 1.7 ms of host time per call
            torch.backends.cuda.enable_cudnn_sdp(False)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, max_len: int, sparse: SparseConfig | None = None) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(self.cfg.num_layers, self.cfg.num_kv_heads, max_len, self.cfg.head_dim, w.dtype, w.device, sparse,
                       self.rope)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, num_logits: int = 1) -> torch.Tensor:
        """Run tokens [T] at positions cache.length.. and return logits [num_logits, vocab] (float32) of the last ones."""
        start = cache.length
        positions = torch.arange(start, start + tokens.shape[0], device=tokens.device)
        cos, sin = self.rope.cos_sin(positions)  # [T, d]
        x = self.embed_tokens(tokens) * self.cfg.scale_emb  # [T, hidden]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start)
        cache.length = start + tokens.shape[0]
        x = self.norm(x[-num_logits:]) * self.cfg.logit_scale
        return self.lm_head(x).float()


def reusable_prefix(cached: list[int], tokens: list[int]) -> int:
    """How many leading positions of a cache that holds `cached` serve `tokens`: their common prefix, but never all
    of `tokens` (at least one token must run to give logits)."""
    n = min(len(cached), len(tokens) - 1)
    if cached[:n] == tokens[:n]:  # the usual case, compared at C speed
        return n
    return next(i for i in range(n) if cached[i] != tokens[i])


def prefill(model: Transformer, cache: KVCache, cached: list[int], tokens: list[int], keep: int, chunk: int,
            on_progress=None) -> torch.Tensor:
    """Bring `cache`, which holds the keys and values of `cached`, to hold those of `tokens`: keep its first `keep`
    positions (see reusable_prefix) and run the rest in chunks of `chunk` tokens, which bounds the activations of a
    long prompt. `cached` is updated in place after each chunk, so it names what the cache holds even when
    interrupted. on_progress(done, total) follows the chunks. Returns the last position's logits [1, V]."""
    cache.truncate(keep)
    del cached[keep:]
    ids = torch.tensor(tokens, dtype=torch.long, device=cache.k.device)  # [len(tokens)]
    for begin in range(keep, len(tokens), chunk):
        end = min(begin + chunk, len(tokens))
        logits = model(ids[begin:end], cache)
        cached += tokens[begin:end]
        if on_progress:
            on_progress(end - keep, len(tokens) - keep)
    return logits
