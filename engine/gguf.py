"""A GGUF file as a model: its metadata as a Hugging Face config dict, its byte-level BPE vocabulary as a tokenizer,
and its tensors in their own (quantized) blocks under the names the engine's Transformer uses.

Supported: the llama (Llama 2/3, Mistral), qwen2 and qwen3 architectures; GGML types as kernels/quant.py lists them.
Anything else, and any damage to the file, is an InferError naming the file (and the tensor or key).
"""

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from infer.kernels import quant

from .errors import InferError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

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
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",
}

# llama.cpp token types (tokenizer.ggml.token_type)
CONTROL, USER_DEFINED = 3, 4

# The split the Qwen2 vocabulary was trained with (single digits, letters with one leading non-letter, ...).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # version 1 had 32-bit lengths (2023); llama.cpp writes 3
# GGUF metadata value types: struct format of the scalars (8: string, 9: array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
         10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # as the model uses it: outermost first (GGUF lists its dimensions innermost first)
    type_code: int  # the GGML type
    offset: int  # of its bytes in the file
    n_bytes: int


class GGUFFile:
    """A GGUF file's metadata (`fields`: key -> value, arrays as lists) and tensor infos, read with struct and numpy
    from a memory map: gguf-py's GGUFReader builds an object per array element and takes ~8 s for a 151K-token
    vocabulary, this ~0.3 s. The tensor bytes stay in the map until `data` reads them."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self.file_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.map = np.frombuffer(self.file_map, dtype=np.uint8)
        self.buf = memoryview(self.map)
        if bytes(self.buf[:4]) != GGUF_MAGIC:
            raise ValueError("bad magic: not a GGUF file")
        self.pos = 4
        version, n_tensors, n_fields = self.unpack("<IQQ")
        if version not in GGUF_VERSIONS:
            raise ValueError(f"GGUF version {version}, not one of {GGUF_VERSIONS}")
        self.fields = {}
        for _ in range(n_fields):
            key = self.string()
            self.fields[key] = self.value(self.unpack("<I")[0])
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            n_dims = self.unpack("<I")[0]
            if not 1 <= n_dims <= 4:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = self.unpack(f"<{n_dims}Q")
            type_code, offset = self.unpack("<IQ")
            infos.append((name, tuple(reversed(dims)), type_code, offset))
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1:
            raise ValueError(f"general.alignment {alignment!r}")
        start = -(-self.pos // alignment) * alignment
        self.tensors = []
        for name, shape, type_code, offset in infos:
            qtype = quant.QUANT_TYPES_BY_CODE.get(type_code)
            n_bytes = 0 if qtype is None else int(np.prod(shape, dtype=np.int64)) // qtype.block_elems * qtype.block_bytes
            if start + offset + n_bytes > len(self.map):
                raise ValueError(f"tensor {name}'s data runs past the end of the file")
            self.tensors.append(TensorInfo(name, shape, type_code, start + offset, n_bytes))

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        n = self.unpack("<Q")[0]
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int):
        if kind in SCALARS:
            return self.unpack("<" + SCALARS[kind])[0]
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, n = self.unpack("<IQ")
        if item in NUMPY:
            values = np.frombuffer(self.map, NUMPY[item], count=n, offset=self.pos)
            self.pos += values.nbytes
            return values.tolist()
        return [self.value(item) for _ in range(n)]

    def data(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes, copied out of the map: uint8 [n_bytes]. The pages read leave this process's resident
        memory (read again from the file if needed again): else, as a model loads, its whole file would come to be
        resident beside the weights made of it."""
        out = np.array(self.map[info.offset:info.offset + info.n_bytes])
        first = -(-info.offset // mmap.PAGESIZE) * mmap.PAGESIZE  # the whole pages inside the tensor's bytes
        last = (info.offset + info.n_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            self.file_map.madvise(mmap.MADV_DONTNEED, first, last - first)
        return out


def open_gguf(path: Path) -> GGUFFile:
    if not path.is_file():
        raise InferError(f"{path}: no such GGUF file")
    try:
        return GGUFFile(path)
    except (ValueError, struct.error, OSError) as e:  # a cut or damaged file
        raise InferError(f"{path.name}: truncated or not a GGUF file ({e})") from None


_REQUIRED = object()


def field(reader: GGUFFile, key: str, default=_REQUIRED):
    if key not in reader.fields:
        if default is _REQUIRED:
            raise InferError(f"{reader.path.name}: GGUF metadata lacks {key!r}")
        return default
    return reader.fields[key]


def model_config(reader: GGUFFile, arch: str) -> dict:
    hidden, heads = field(reader, f"{arch}.embedding_length"), field(reader, f"{arch}.attention.head_count")
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": field(reader, f"{arch}.attention.key_length", None),  # None: hidden_size // heads
        "hidden_act": "silu",
        "rms_norm_eps": f32(field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": f32(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": field(reader, f"{arch}.context_length"),
        "torch_dtype": "bfloat16",
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    return config


def f32(x):
    """GGUF stores float32: keep its shortest decimal form (9.999999747378752e-06 -> 1e-05). Not a number: as it is
    (ModelConfig.from_dict names the field)."""
    if isinstance(x, float):
        return float(str(np.float32(x)))
    return x


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


def special_token_ids(reader: GGUFFile) -> dict[str, int]:
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


def build_tokenizer(reader: GGUFFile, ids: dict[str, int], source: str) -> tuple[Tokenizer, dict]:
    """The tokenizers.Tokenizer for the GGUF's tokenizer.ggml.* metadata, and its tokenizer_config.json."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise InferError(f"{source}: unsupported GGUF tokenizer {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", [])
    merges = field(reader, "tokenizer.ggml.merges", [])
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) and isinstance(types, list)
            and all(isinstance(t, int) for t in types) and isinstance(merges, list)
            and all(isinstance(m, str) and " " in m for m in merges)):
        raise InferError(f"{source}: the vocabulary metadata (tokenizer.ggml.tokens, token_type, merges) is malformed")
    if any(not isinstance(i, int) or not 0 <= i < len(tokens) for i in ids.values()):
        raise InferError(f"{source}: a special token id is outside the vocabulary of {len(tokens)} tokens")
    merges = [tuple(m.split(" ", 1)) for m in merges]
    try:
        tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    except Exception as e:  # tokenizers raises plain Exception on an inconsistent vocabulary
        raise InferError(f"{source}: the vocabulary metadata is inconsistent ({e})") from None
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




@dataclass
class GGUFTensor:
    """One tensor of a GGUF model: its checkpoint name (as a Hugging Face folder names it), its GGML type, and its
    bytes as the file holds them: uint8 [rows, row_bytes] (a 1-D tensor is one row) in the file's block layout, with
    llama's q/k rows already put back in Hugging Face's order (rows are whole blocks: the reorder is exact)."""

    name: str
    qtype: quant.QuantType
    data: torch.Tensor  # uint8 [rows, row_bytes]
    shape: tuple[int, ...]  # the logical shape: (out, in) or (n,)


@dataclass
class GGUFModel:
    path: Path
    config: dict  # the config.json a Hugging Face folder of this model would have
    tokenizer: Tokenizer
    tokenizer_config: dict  # the tokenizer_config.json likewise (special tokens, chat template)
    readers: list[GGUFFile]  # the file, or each part of a split GGUF (-00001-of-0000N.gguf ...) in order

    def infos(self) -> list[tuple[GGUFFile, TensorInfo]]:
        """Every tensor's info with its file, across the parts."""
        return [(reader, t) for reader in self.readers for t in reader.tensors]

    def tensors(self):
        """The tensors one at a time (each read from the memory-mapped file as it comes)."""
        rope_heads = {}
        if self.config["model_type"] == "llama":  # llama.cpp reorders llama's q/k rows for its interleaved RoPE
            rope_heads = {"attn_q": self.config["num_attention_heads"], "attn_k": self.config["num_key_value_heads"]}
        for reader, t in self.infos():
            name, kind = hf_tensor_name(t.name, self.path.name)
            try:
                qtype = quant.quant_type(t.type_code)
            except InferError as e:
                raise InferError(f"{self.path.name}: tensor {t.name}: {e}") from None
            if t.shape[-1] % qtype.block_elems:
                raise InferError(f"{self.path.name}: tensor {t.name} of shape {t.shape} is not whole {qtype.name} blocks")
            row_bytes = t.shape[-1] // qtype.block_elems * qtype.block_bytes
            data = torch.from_numpy(reader.data(t).reshape(-1, row_bytes))  # [rows, row_bytes]
            if kind in rope_heads:
                data = unpermute_rope(data, rope_heads[kind])
            yield GGUFTensor(name, qtype, data, t.shape)


def read_gguf(path: Path) -> GGUFModel:
    """The model in the GGUF file at `path` (a split GGUF's first part: the others beside it): its metadata checked and
    turned into a config and a tokenizer."""
    path = Path(path)
    reader = open_gguf(path)
    readers = [reader] + [open_gguf(part) for part in split_parts(path)[1:]]
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise InferError(f"{path.name}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    if field(reader, f"{arch}.rope.scaling.type", "none") != "none":
        raise InferError(f"{path.name}: RoPE scaling in GGUF files is not supported")
    config = model_config(reader, arch)
    if config["head_dim"] is None:
        del config["head_dim"]
    ids = special_token_ids(reader)
    tokenizer, tokenizer_config = build_tokenizer(reader, ids, path.name)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    infos = {t.name: t for r in readers for t in r.tensors}
    if "token_embd.weight" not in infos or len(infos["token_embd.weight"].shape) != 2:
        raise InferError(f"{path.name}: no token_embd.weight matrix")
    config["vocab_size"] = infos["token_embd.weight"].shape[0]
    config["tie_word_embeddings"] = "output.weight" not in infos
    config["attention_bias"] = "blk.0.attn_q.bias" in infos
    config.update({f"{name}_token_id": i for name, i in ids.items() if name != "unk"})
    return GGUFModel(path, config, tokenizer, tokenizer_config, readers)


SPLIT = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")  # llama.cpp's split files: NAME-00001-of-00003.gguf


def split_parts(path: Path) -> list[Path]:
    """The parts of the split GGUF whose first part is `path` ([path] when it is not split)."""
    m = SPLIT.fullmatch(path.name)
    if m is None:
        return [path]
    if int(m[2]) != 1:
        raise InferError(f"{path.name} is part {int(m[2])} of a split GGUF: give its first part")
    parts = [path.with_name(f"{m[1]}-{i:05d}-of-{m[3]}.gguf") for i in range(1, int(m[3]) + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise InferError(f"{path.name}: the split GGUF lacks its parts {', '.join(missing)}")
    return parts


def gguf_file(path: Path) -> Path | None:
    """The GGUF file a MODEL path names: the file itself, or the only .gguf file of a folder without config.json
    (a split GGUF's first part); None when the path is not a GGUF model."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(p for p in path.glob("*.gguf") if (m := SPLIT.fullmatch(p.name)) is None or int(m[2]) == 1)
    if len(files) > 1:
        raise InferError(f"{path} holds several GGUF files ({', '.join(p.name for p in files)}): name one")
    return files[0] if files else None
