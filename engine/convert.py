"""Convert a GGUF checkpoint (llama or qwen2 architecture, byte-level BPE vocabulary) into a Hugging Face model folder.

The folder holds a bf16 model.safetensors, config.json, generation_config.json, tokenizer.json and
tokenizer_config.json, so the engine and transformers load it like any checkpoint from the Hub.
"""

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .errors import InferError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {  # blk.N.<gguf>.{weight,bias} -> model.layers.N.<hf>.{weight,bias}
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# llama.cpp token types (tokenizer.ggml.token_type)
CONTROL, USER_DEFINED = 3, 4

# The split the Qwen2 vocabulary was trained with (single digits, letters with one leading non-letter, ...).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face folder for gguf_path into out_dir (created if needed) and return out_dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise InferError(f"{gguf_path.name}: unsupported GGUF architecture {arch!r}; supported: {supported}")
    if field(reader, f"{arch}.rope.scaling.type", "none") != "none":
        raise InferError(f"{gguf_path.name}: RoPE scaling in GGUF files is not supported")

    config = model_config(reader, arch)
    ids = special_token_ids(reader)
    tokenizer, tokenizer_config = build_tokenizer(reader, ids, gguf_path.name)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    tensors = convert_tensors(reader, config, gguf_path.name)
    config["vocab_size"] = tensors["model.embed_tokens.weight"].shape[0]
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in tensors
    config.update({f"{name}_token_id": i for name, i in ids.items() if name != "unk"})

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", {k: v for k, v in config.items() if k.endswith("_token_id")})
    return out_dir


def open_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise InferError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with assorted numpy errors on a cut or damaged file
        raise InferError(f"{path.name}: truncated or not a GGUF file ({type(e).__name__}: {e})") from None


_REQUIRED = object()


def field(reader: gguf.GGUFReader, key: str, default=_REQUIRED):
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise InferError(f"GGUF metadata lacks {key!r}")
        return default
    return f.contents()


def model_config(reader: gguf.GGUFReader, arch: str) -> dict:
    hidden, heads = field(reader, f"{arch}.embedding_length"), field(reader, f"{arch}.attention.head_count")
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": field(reader, f"{arch}.attention.key_length", hidden // heads),
        "hidden_act": "silu",
        "rms_norm_eps": f32(field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": f32(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": field(reader, f"{arch}.context_length"),
        "torch_dtype": "bfloat16",
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    return config


def f32(x: float) -> float:
    """GGUF stores float32: keep its shortest decimal form (9.999999747378752e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def convert_tensors(reader: gguf.GGUFReader, config: dict, source: str) -> dict[str, torch.Tensor]:
    # llama.cpp reorders the q/k rows of llama models for its interleaved RoPE; qwen2 uses HF's rotate-half layout as is
    rope_heads = {}
    if config["model_type"] == "llama":
        rope_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    for t in reader.tensors:
        name, kind = hf_tensor_name(t.name, source)
        try:
            w = torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))  # [out, in] or [n], numpy order = HF order
        except NotImplementedError:
            raise InferError(f"{source}: tensor {t.name} has unsupported type {t.tensor_type.name}") from None
        if kind in rope_heads:
            w = unpermute_rope(w, rope_heads[kind])
        tensors[name] = w.to(torch.bfloat16)
    expected = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{hf}.weight" for i in range(config["num_hidden_layers"]) for hf in LAYER_TENSORS.values()
    ]
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise InferError(f"{source}: {len(missing)} tensors missing, e.g. {missing[0]}")
    return tensors


def hf_tensor_name(gguf_name: str, source: str) -> tuple[str, str]:
    """(HF name, GGUF kind such as 'attn_q') of a GGUF tensor."""
    if gguf_name in TOP_TENSORS:
        return TOP_TENSORS[gguf_name], gguf_name
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or m[2] not in LAYER_TENSORS:
        raise InferError(f"{source}: unsupported tensor {gguf_name!r}")
    return f"model.layers.{m[1]}.{LAYER_TENSORS[m[2]]}.{m[3]}", m[2]


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order. Within a head of d rows, llama.cpp stores HF row h*d/2 + i (half h, pair i)
    at row 2*i + h; w is [n_heads * d, ...]."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def special_token_ids(reader: gguf.GGUFReader) -> dict[str, int]:
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}
    ids = {name: field(reader, f"tokenizer.ggml.{key}", None) for name, key in keys.items()}
    return {name: i for name, i in ids.items() if i is not None}


def byte_level_pre_tokenizer(pre: str, source: str) -> pre_tokenizers.PreTokenizer:
    """The split llama.cpp applies for tokenizer.ggml.pre, followed by GPT-2's byte-to-unicode mapping."""
    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":  # GPT-2's split, each digit on its own
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre == "qwen2":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise InferError(f"{source}: unsupported GGUF pre-tokenizer {pre!r}; supported: gpt2, smollm, qwen2")


def build_tokenizer(reader: gguf.GGUFReader, ids: dict[str, int], source: str) -> tuple[Tokenizer, dict]:
    """The tokenizers.Tokenizer for the GGUF's tokenizer.ggml.* metadata, and its tokenizer_config.json."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise InferError(f"{source}: unsupported GGUF tokenizer {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    pre = field(reader, "tokenizer.ggml.pre", "gpt2")
    if pre == "qwen2":  # Qwen2's own tokenizer normalizes to NFC first
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(pre, source)
    tokenizer.decoder = decoders.ByteLevel()

    add_bos = field(reader, "tokenizer.ggml.add_bos_token", False)
    add_eos = field(reader, "tokenizer.ggml.add_eos_token", False)
    if (add_bos and "bos" not in ids) or (add_eos and "eos" not in ids):
        raise InferError(f"{source}: the GGUF asks to add a BOS/EOS token but names none")
    first = [tokens[ids["bos"]]] if add_bos else []
    last = [tokens[ids["eos"]]] if add_eos else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=first + ["$A"] + last,
        pair=first + ["$A"] + last + first + ["$B:1"] + last,
        special_tokens=[(tokens[ids[name]], ids[name]) for name, on in (("bos", add_bos), ("eos", add_eos)) if on],
    )
    # control tokens (<|im_start|>, ...) are special; user-defined ones (<tool_call>, ...) are matched whole but decoded
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user_defined = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user_defined)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        **{f"{name}_token": tokens[i] for name, i in ids.items()},
        "added_tokens_decoder": {
            str(i): {k: getattr(t, k) for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
        },
    }
    template = field(reader, "tokenizer.chat_template", None)
    if template:
        config["chat_template"] = template
    return tokenizer, config


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
