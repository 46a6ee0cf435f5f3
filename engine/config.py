"""Model configuration: one dataclass for every supported architecture, read from a Hugging Face config.json."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InferError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "minicpm")
SPARSE_MODES = ("auto", "on", "off")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    params: dict = field(default_factory=dict)  # the scaling keys of rope_scaling / rope_parameters (factor, ...)


@dataclass
class SparseConfig:
    """Block-sparse attention (InfLLM-V2); the defaults are MiniCPM4's published sparse_config."""

    kernel_size: int = 32  # keys pooled into one summary
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
            raise InferError(f"sparse mode {self.mode!r}: expected one of {', '.join(SPARSE_MODES)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InferError(f"sparse block size {self.block_size}: must be a power of two, at least 16")
        if min(self.kernel_size, self.kernel_stride, self.topk, self.init_blocks + 1) < 1 or self.window_size < 0:
            raise InferError("sparse kernel size, stride and top-k must be positive; window and init blocks not negative")


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
        try:
            raw = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InferError(f"{config_file} is not valid JSON: {e}") from None
        cfg = ModelConfig.from_dict(raw)
        generation_file = Path(path) / "generation_config.json"  # may list more end-of-turn ids than config.json
        if generation_file.is_file():
            try:
                extra = id_list(json.loads(generation_file.read_text()).get("eos_token_id"))
            except json.JSONDecodeError:
                extra = []
            cfg.eos_token_ids += [i for i in extra if i not in cfg.eos_token_ids]
        return cfg

    @staticmethod
    def from_dict(raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InferError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            hidden, heads, layers = raw["hidden_size"], raw["num_attention_heads"], raw["num_hidden_layers"]
            cfg = ModelConfig(
                model_type=model_type,
                vocab_size=raw["vocab_size"],
                hidden_size=hidden,
                intermediate_size=raw["intermediate_size"],
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or hidden // heads,
                rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
                max_position_embeddings=raw.get("max_position_embeddings", 4096),
                tie_word_embeddings=raw.get("tie_word_embeddings", model_type == "minicpm"),
                attention_bias=raw.get("attention_bias", model_type == "qwen2"),
                qk_norm=model_type == "qwen3",
                rope=_rope_config(raw),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=id_list(raw.get("eos_token_id")),
            )
        except KeyError as e:
            raise InferError(f"config.json lacks the key {e.args[0]!r}") from None
        if model_type == "minicpm":
            cfg.scale_emb = raw.get("scale_emb", 1.0)
            cfg.residual_scale = raw.get("scale_depth", 1.0) / math.sqrt(layers)
            cfg.logit_scale = raw.get("dim_model_base", hidden) / hidden
        if raw.get("sparse_config"):
            known = SparseConfig.__dataclass_fields__
            cfg.sparse = SparseConfig(**{k: v for k, v in raw["sparse_config"].items() if k in known})
        if cfg.num_heads % cfg.num_kv_heads:
            raise InferError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {cfg.num_kv_heads}")
        return cfg


def id_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _rope_config(raw: dict) -> RopeConfig:
    """Accept both the classic rope_theta/rope_scaling keys and the newer rope_parameters dict."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type == "su":  # the old name of longrope
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        raise InferError(f"unsupported rope scaling {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    return RopeConfig(theta=theta, type=rope_type, params=params)
