"""Model configuration: one dataclass for every supported architecture, read from a Hugging Face config.json."""

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InferError, ParameterError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "minicpm")
# Sanity bounds on config.json sizes (far beyond any real model; they stop a hostile file from hanging the build)
MAX_VOCAB = 1 << 22
MAX_WIDTH = 1 << 16  # hidden_size; intermediate_size up to 16x
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_POSITIONS = 1 << 24
SPARSE_MODES = ("auto", "on", "off")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    params: dict = field(default_factory=dict)  # the scaling keys of rope_scaling / rope_parameters (factor, ...)


@dataclass
class SparseConfig:
    """Block-sparse attention (InfLLM-V2). The defaults are MiniCPM4's published sparse_config except the summaries:
    MiniCPM4 pools 32 keys every 16 tokens. Models trained dense (all but MiniCPM4, which ships its own) keep more of
    dense attention's answers with windows of 16 every 16 tokens: as many summaries for the selection to read and
    score, each the mean of half as many keys (BENCHMARKS.md, issue 22)."""

    kernel_size: int = 16  # keys pooled into one summary
    kernel_stride: int = 16  # distance between summary windows
    init_blocks: int = 1  # leading blocks always attended (attention sink)
    block_size: int = 64  # keys per selectable block
    window_size: int = 2048  # trailing tokens always attended
    topk: int = 64  # blocks attended per query tile, forced ones included
    use_nope: bool = False  # score blocks with queries/keys before RoPE
    dense_len: int = 8192  # sequences up to this length stay dense
    mode: str = "auto"  # "auto": sparse past dense_len; "on": always sparse; "off": always dense

    def __post_init__(self):
        if self.mode not in SPARSE_MODES:
            raise ParameterError("mode", f"must be one of {', '.join(SPARSE_MODES)}, got {self.mode!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ParameterError("block_size", f"must be a power of two, at least 16, got {self.block_size}")
        for name in ("kernel_size", "kernel_stride", "topk", "dense_len"):
            if getattr(self, name) < 1:
                raise ParameterError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("window_size", "init_blocks"):
            if getattr(self, name) < 0:
                raise ParameterError(name, f"must not be negative, got {getattr(self, name)}")
        if self.kernel_stride > self.kernel_size:
            raise ParameterError("kernel_stride",
                                 f"{self.kernel_stride} must not exceed {{kernel_size}} ({self.kernel_size})",
                                 ("kernel_size",))


def sparse_config(model_sparse: SparseConfig | None, **overrides) -> SparseConfig | None:
    """The model's sparse_config (else the defaults) with the non-None overrides; None when the mode is "off"."""
    values = dict(vars(model_sparse)) if model_sparse is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = SparseConfig(**values)
    return None if cfg.mode == "off" else cfg


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (qwen2)
    qk_norm: bool = False  # RMSNorm on each head of q and k before RoPE (qwen3)
    rope: RopeConfig = field(default_factory=RopeConfig)
    scale_emb: float = 1.0  # MiniCPM: embeddings are multiplied by this
    residual_scale: float = 1.0  # MiniCPM: scale_depth / sqrt(num_layers) on each residual branch
    logit_scale: float = 1.0  # MiniCPM: the final hidden state is multiplied by dim_model_base / hidden_size
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sparse: SparseConfig | None = None  # the model's own sparse_config, if it ships one

    @staticmethod
    def from_dir(path: Path) -> "ModelConfig":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise InferError(f"{path} has no config.json: not a Hugging Face model folder")
        cfg = ModelConfig.from_dict(read_json_object(config_file), source=str(config_file))
        generation_file = Path(path) / "generation_config.json"  # may list more end-of-turn ids than config.json
        if generation_file.is_file():
            extra = token_ids(read_json_object(generation_file), "eos_token_id", str(generation_file))
            cfg.eos_token_ids += [i for i in extra if i not in cfg.eos_token_ids]
        return cfg

    @staticmethod
    def from_dict(raw: dict, source: str = "config.json") -> "ModelConfig":
        """The config of a config.json's contents; every field the engine reads is checked for its type and a sane
        range first, and an InferError names `source` and the field."""
        if not isinstance(raw, dict):
            raise InferError(f"{source} must hold a JSON object, not {type(raw).__name__}")
        get = functools.partial(_field, raw, source)
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InferError(f"unsupported model_type {model_type!r} in {source}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        hidden = get("hidden_size", int, hi=MAX_WIDTH)
        heads = get("num_attention_heads", int, hi=MAX_HEADS)
        layers = get("num_hidden_layers", int, hi=MAX_LAYERS)
        kv_heads = get("num_key_value_heads", int, heads, hi=heads)
        head_dim = get("head_dim", int, None, hi=MAX_HEAD_DIM)
        if head_dim is None:
            if hidden % heads:
                raise InferError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                                 f"(and no head_dim is given)")
            head_dim = hidden // heads
        if head_dim % 2:
            raise InferError(f"{source}: head_dim {head_dim} must be even (rotary embeddings rotate pairs)")
        if heads % kv_heads:
            raise InferError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        cfg = ModelConfig(
            model_type=model_type,
            vocab_size=get("vocab_size", int, hi=MAX_VOCAB),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int, hi=MAX_WIDTH * 16),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=get("rms_norm_eps", float, 1e-6, lo=0.0, hi=1.0, lo_open=True),
            max_position_embeddings=get("max_position_embeddings", int, 4096, hi=MAX_POSITIONS),
            tie_word_embeddings=get("tie_word_embeddings", bool, model_type == "minicpm"),
            attention_bias=get("attention_bias", bool, model_type == "qwen2"),
            qk_norm=model_type == "qwen3",
            rope=_rope_config(raw, head_dim, source),
            bos_token_id=get("bos_token_id", int, None, lo=0),
            eos_token_ids=token_ids(raw, "eos_token_id", source),
        )
        if model_type == "minicpm":
            cfg.scale_emb = get("scale_emb", float, 1.0, lo=0.0, lo_open=True)
            cfg.residual_scale = get("scale_depth", float, 1.0, lo=0.0, lo_open=True) / math.sqrt(layers)
            cfg.logit_scale = get("dim_model_base", float, hidden, lo=0.0, lo_open=True) / hidden
        sparse = get("sparse_config", dict, None)
        if sparse:
            try:
                cfg.sparse = SparseConfig(**_sparse_fields(sparse, f"{source}: sparse_config"))
            except ParameterError as e:
                raise InferError(f"{source}: sparse_config {e}") from None
        return cfg


def token_ids(raw: dict, key: str, source: str) -> list[int]:
    """The token id, or list of ids, under `key` (absent or null: none)."""
    value = raw.get(key)
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise InferError(f"{source}: {key} must be a token id or a list of token ids, got {value!r}")
    return ids


def read_json_object(file: Path) -> dict:
    """The JSON object in `file`; anything else (unreadable, not JSON, a list) is an InferError naming the file."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InferError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InferError(f"{file} must hold a JSON object, not {type(raw).__name__}")
    return raw


_REQUIRED = object()
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object",
               list: "a list"}


def _field(raw: dict, source: str, key: str, kind: type, default=_REQUIRED, lo=1, hi=None, lo_open=False):
    """raw[key] checked to be of `kind` (int excludes bool; float takes ints too, never nan or inf) and, for numbers,
    in [lo, hi] (lo excluded when lo_open); a missing key or a null gives `default`, or an error when required."""
    value = raw.get(key)
    if value is None:
        if default is _REQUIRED:
            raise InferError(f"{source} lacks the key {key!r}")
        return default
    number = kind in (int, float)
    ok = isinstance(value, kind) and not (number and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if ok and kind is float:
        ok = math.isfinite(value)
    if not ok:
        raise InferError(f"{source}: {key} must be {_TYPE_NAMES[kind]}, got {value!r}")
    if number and ((value <= lo if lo_open else value < lo) or (hi is not None and value > hi)):
        low = f"{'above' if lo_open else 'at least'} {lo}"
        raise InferError(f"{source}: {key} {value!r} is out of range (must be {low}" +
                         (f" and at most {hi})" if hi is not None else ")"))
    return value


def _sparse_fields(raw: dict, source: str) -> dict:
    """The SparseConfig fields a sparse_config names (unknown keys ignored), each checked for its type."""
    get = functools.partial(_field, raw, source)
    return {k: get(k, f.type, lo=0) for k, f in SparseConfig.__dataclass_fields__.items() if k in raw}


# The keys each rope scaling type reads (engine/rope.py), with the range of each.
_ROPE_KEYS = {
    "linear": {"factor": (float, True)},
    "dynamic": {"factor": (float, True)},
    "llama3": {"factor": (float, True), "low_freq_factor": (float, True), "high_freq_factor": (float, True),
               "original_max_position_embeddings": (int, True)},
    "yarn": {"factor": (float, False), "original_max_position_embeddings": (int, False),
             "attention_factor": (float, False), "beta_fast": (float, False), "beta_slow": (float, False),
             "mscale": (float, False), "mscale_all_dim": (float, False)},
    "longrope": {"original_max_position_embeddings": (int, True), "short_factor": (list, True),
                 "long_factor": (list, True), "factor": (float, False), "attention_factor": (float, False)},
}


def _rope_config(raw: dict, head_dim: int, source: str) -> RopeConfig:
    """Accept both the classic rope_theta/rope_scaling keys and the newer rope_parameters dict."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise InferError(f"{source}: rope_scaling must be a JSON object, got {params!r}")
    params = dict(params)
    theta = params.pop("rope_theta", None)
    theta = _field({"rope_theta": raw.get("rope_theta") if theta is None else theta}, source, "rope_theta", float,
                   10000.0, lo=0.0, lo_open=True)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type == "su":  # the old name of longrope
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        raise InferError(f"unsupported rope scaling {rope_type!r} in {source}; supported: {', '.join(ROPE_TYPES)}")
    for key, (kind, required) in _ROPE_KEYS.get(rope_type, {}).items():
        value = _field(params, f"{source}: rope_scaling", key, kind, _REQUIRED if required else None, lo=0.0,
                       lo_open=True)
        if kind is list and not (len(value) == head_dim // 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value)):
            raise InferError(f"{source}: rope_scaling {key} must be {head_dim // 2} positive numbers")
        if value is not None:
            params[key] = value
    if rope_type == "llama3" and params["low_freq_factor"] >= params["high_freq_factor"]:
        raise InferError(f"{source}: rope_scaling low_freq_factor must be below high_freq_factor")
    return RopeConfig(theta=theta, type=rope_type, params=params)
