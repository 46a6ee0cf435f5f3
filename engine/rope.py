"""Rotary position embeddings with the scaling variants of the supported models (as Hugging Face defines them)."""

import math

import torch

from infer.kernels import rope_append as rope_append_kernel

from .config import ModelConfig


class Rope:
    """The rotary frequencies of a model. `longrope` switches from its short to its long factors past the original
    context; `dynamic` rescales for every length beyond max_position_embeddings (which the engine never exceeds;
    the model supports it for parity with Hugging Face). Otherwise they are fixed."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.dim = cfg.head_dim
        self.base_inv_freq = 1.0 / (cfg.rope.theta ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))
        self.variants = [self._scaled(cfg.max_position_embeddings)]  # [(inv_freq [d/2], attention_factor)]
        if cfg.rope.type == "longrope":
            self.variants.insert(0, self._scaled(cfg.rope.params["original_max_position_embeddings"]))

    def variant(self, seq_len: int) -> int:
        """Which frequencies a sequence of seq_len tokens uses (an index into self.variants)."""
        if self.cfg.rope.type == "longrope":
            return int(seq_len > self.cfg.rope.params["original_max_position_embeddings"])
        if self.cfg.rope.type == "dynamic" and seq_len > self.cfg.max_position_embeddings:
            return seq_len  # not in self.variants: computed per call
        return 0

    def scaling(self, seq_len: int) -> tuple[torch.Tensor, float]:
        """(inv_freq [d/2] float32, attention_factor) for a sequence of seq_len tokens."""
        variant = self.variant(seq_len)
        return self.variants[variant] if variant < len(self.variants) else self._scaled(seq_len)

    def _scaled(self, seq_len: int) -> tuple[torch.Tensor, float]:
        p, max_pos, inv_freq = self.cfg.rope.params, self.cfg.max_position_embeddings, self.base_inv_freq
        kind = self.cfg.rope.type
        if kind == "linear":
            return inv_freq / p["factor"], 1.0
        if kind == "dynamic":
            seq_len = max(seq_len, max_pos)
            base = self.cfg.rope.theta * ((p["factor"] * seq_len / max_pos) - (p["factor"] - 1)) ** (self.dim / (self.dim - 2))
            return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=self.device).float() / self.dim)), 1.0
        if kind == "llama3":
            return _llama3(inv_freq, p), 1.0
        if kind == "yarn":
            return _yarn(inv_freq, p, self.dim, self.cfg.rope.theta, max_pos)
        if kind == "longrope":
            original = p["original_max_position_embeddings"]
            factor = p.get("factor") or max_pos / original
            attention_factor = p.get("attention_factor")
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
            ext = p["long_factor"] if seq_len > original else p["short_factor"]
            return inv_freq / torch.tensor(ext, dtype=torch.float32, device=self.device), attention_factor
        return inv_freq, 1.0

    def cos_sin(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 of a sequence of seq_len tokens -> cos, sin [T, head_dim] float32."""
        return rope_append_kernel.cos_sin(positions, *self.scaling(seq_len))


def rope_append(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float,
                k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                **options) -> torch.Tensor:
    """kernels.rope_append (its kernel on CUDA, its reference elsewhere): q [Hq, T, d] rotated, k and v appended."""
    run = rope_append_kernel.rope_append if qkv.is_cuda else rope_append_kernel.reference
    return run(qkv, positions, inv_freq, attention_factor, k_cache, v_cache, num_heads, num_kv_heads, head_dim,
               **options)


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of kernels.rope_append.rotate (attention factor included, as cos^2 + sin^2): x [H, T, d] -> fp32
    [H, T, d]."""
    xf = x.float()
    return (xf * cos - rope_append_kernel.rotate_half(xf) * sin) / (cos * cos + sin * sin)


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(inv_freq: torch.Tensor, p: dict, dim: int, theta: float, max_pos: int) -> tuple[torch.Tensor, float]:
    original = p.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, device=inv_freq.device).float() - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation, attention_factor
