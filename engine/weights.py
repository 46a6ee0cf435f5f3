"""Load checkpoints tensor by tensor onto the target device and dtype: safetensors folders (single file or sharded)
and GGUF files (their quantized weights kept in their blocks where the kernels read them)."""

from pathlib import Path, PurePosixPath

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open

from infer.kernels import quant

from .config import ModelConfig, read_json_object
from .errors import InferError, ParameterError
from .gguf import GGUFTensor, gguf_file, hf_tensor_name, read_gguf
from .linear import Embedding, Linear
from .memory import freed_when_loaded
from .model import Transformer
from .parallel import Parallel
from .sampling import generation_defaults
from .tokenizer import Tokenizer

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map each tensor name of the checkpoint in `path` to the safetensors file that holds it. A shard index may only
    name files inside the folder (no absolute paths, no '..')."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InferError(f"{index} is corrupt: its weight_map must map tensor names to file names")
        outside = [s for s in set(weight_map.values()) if not _inside(s)]
        if outside:
            raise InferError(f"{index} names {outside[0]!r}, a file outside the model folder: refused")
        files = {name: path / shard for name, shard in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise InferError(f"{path} lacks the weight shards {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise InferError(f"{path} has no model.safetensors or {INDEX_FILE}: no weights to load")
    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise InferError(f"{single} is not a readable safetensors file ({e})") from None


def _inside(name: str) -> bool:
    """Whether a file name from a model folder's own files stays inside the folder: a relative path without '..'.
    (Symbolic links are followed as they are: a Hugging Face cache snapshot links its files into the cache's blobs.)"""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name


class Checkpoint:
    """A model on disk: a Hugging Face folder (config.json, safetensors, tokenizer files, generation_config.json) or
    a GGUF file (engine/gguf.py), which holds all of that in its metadata and keeps its weights quantized."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.gguf = None
        file = gguf_file(self.path)
        if file is not None:
            self.path, self.gguf = file, read_gguf(file)
        elif not self.path.is_dir():
            raise InferError(f"model folder {self.path} does not exist")

    def config(self) -> ModelConfig:
        if self.gguf is not None:
            return ModelConfig.from_dict(self.gguf.config, source=self.path.name)
        return ModelConfig.from_dir(self.path)

    def tokenizer(self) -> Tokenizer:
        if self.gguf is not None:
            return Tokenizer.from_gguf(self.gguf.tokenizer, self.gguf.tokenizer_config)
        return Tokenizer.from_dir(self.path)

    def generation_defaults(self) -> dict:
        """Sampling defaults (a GGUF file has none)."""
        return {} if self.gguf is not None else generation_defaults(self.path)

    def weight_bytes(self, cfg: ModelConfig, dtype: torch.dtype, packed: bool, quantize: str | None = None) -> int:
        """The bytes the weights take once loaded: those `keeps_blocks` keeps in their blocks as a GGUF file holds
        them, or with `quantize` (a float checkpoint's matrices) in that format's; every other weight in `dtype`."""
        with torch.device("meta"):
            model = Transformer(cfg)  # sizes only: nothing is allocated
        sizes = {name: p.numel() for name, p in model.named_parameters()}  # elements, by parameter name
        if cfg.tie_word_embeddings:
            sizes.pop("lm_head.weight")  # its weight is the embedding's
        if quantize is not None:
            qt = QUANTIZE[quantize]
            blocks = {f"{name}.weight": sizes[f"{name}.weight"] // qt.block_elems * qt.block_bytes
                      for name, m in model.named_modules() if isinstance(m, (Linear, Embedding))
                      and f"{name}.weight" in sizes}
        elif self.gguf is not None:
            blocks = {hf_tensor_name(t.name, self.path.name)[0].removeprefix("model."): t.n_bytes
                      for _, t in self.gguf.infos() if len(t.shape) == 2 and t.type_code not in FLOATS}
        else:
            blocks = {}
        return sum(blocks[name] if name in blocks and keeps_blocks(name, cfg, packed) else n * dtype.itemsize
                   for name, n in sizes.items())


def keeps_blocks(name: str, cfg: ModelConfig, packed: bool) -> bool:
    """Whether weight `name` (of a model of cfg), when its checkpoint holds it in blocks, stays in them once loaded:
    every such weight when packed (on CUDA, engine/linear.py), else only an embedding table that is not also the LM
    head (a lookup decodes just its rows)."""
    return packed or (name == "embed_tokens.weight" and not cfg.tie_word_embeddings)


FLOATS = {quant.QUANT_TYPES[name].code for name in ("F32", "F16", "BF16")}  # GGML types no kernel decodes
# --quantize: a float checkpoint's matrices rounded to the nearest in these blocks as they load, so they run through
# the GGUF kernels: int8 symmetric (Q8_0: an fp16 scale per 32 weights, 8.5 bits a weight), int4 asymmetric (Q4_1: a
# scale and a minimum per 32, 5 bits a weight; on the Qwen demo +0.13 nats a token against symmetric Q4_0's +0.32,
# BENCHMARKS.md)
QUANTIZE = {"int8": quant.QUANT_TYPES["Q8_0"], "int4": quant.QUANT_TYPES["Q4_1"]}


def load_model(checkpoint: Checkpoint, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
               progress: bool = True, packed: bool | None = None, quantize: str | None = None,
               parallel: Parallel | None = None) -> Transformer:
    """Build the model of `cfg` (the checkpoint's config) on the meta device, then fill it one tensor at a time from
    the memory-mapped checkpoint. packed: keep quantized weights in their blocks (default: on CUDA; see
    engine/linear.py). quantize: "int8" or "int4" (QUANTIZE), for a float checkpoint's matrices. parallel: load
    only this tensor-parallel rank's slice of each weight (engine/parallel.py)."""
    if quantize is not None and (quantize not in QUANTIZE or checkpoint.gguf is not None):
        raise ParameterError("quantize", f"must be one of {', '.join(QUANTIZE)}, for a float checkpoint"
                                         + (" (a GGUF is quantized already)" if checkpoint.gguf is not None else ""))
    with torch.device("meta"):
        model = Transformer(cfg, parallel)
    expected = dict(model.named_parameters())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    packed = device.type == "cuda" if packed is None else packed
    with freed_when_loaded():  # and model.setup's (fusing q/k/v, gate/up)
        with Progress(TextColumn("loading weights"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), disable=not progress, transient=True) as bar:
            task = bar.add_task("load", total=len(expected))
            tensors = (_gguf_tensors(checkpoint) if checkpoint.gguf is not None
                       else _safetensors(checkpoint.path, expected))
            loaded = set()
            for name, tensor in tensors:
                name = name.removeprefix("model.")
                if name not in expected:
                    continue
                if quantize is not None and name.endswith("weight") and isinstance(
                        model.get_submodule(name.rpartition(".")[0]), (Linear, Embedding)):
                    qt = QUANTIZE[quantize]
                    tensor = GGUFTensor(name, qt, quant.quantize(tensor.to(device), qt), tuple(tensor.shape))
                _assign(model, name, tensor, expected[name].shape, device, dtype, keeps_blocks(name, cfg, packed))
                loaded.add(name)
                bar.advance(task)
        missing = [n for n in expected if n not in loaded]
        if missing:
            raise InferError(f"{checkpoint.path} lacks the weight {missing[0]}" +
                             (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        model.setup(device, dtype)
    return model


def _safetensors(path: Path, expected: dict):
    """(checkpoint name, tensor) of a folder's safetensors, one at a time, those the model expects."""
    by_file: dict[Path, list[str]] = {}
    for ckpt_name, file in checkpoint_files(path).items():
        if ckpt_name.removeprefix("model.") in expected:
            by_file.setdefault(file, []).append(ckpt_name)
    for file, names in by_file.items():
        try:
            with safe_open(file, "pt") as f:
                for ckpt_name in names:
                    yield ckpt_name, f.get_tensor(ckpt_name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InferError(f"cannot read weights from {file.name}: the file is truncated or corrupt ({e})") from None


def _gguf_tensors(checkpoint: Checkpoint):
    for t in checkpoint.gguf.tensors():
        yield t.name, t


def _assign(model: Transformer, name: str, tensor: torch.Tensor | GGUFTensor, shape: torch.Size, device, dtype,
            packed: bool) -> None:
    """Set parameter `name` (of local shape `shape`) from a checkpoint tensor: the whole tensor, of which a layer that
    holds a tensor-parallel slice (a Linear's or an Embedding's Shard) keeps its slice."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    shard = getattr(module, "shard", None)
    full = tuple(shape)
    if shard is not None:
        full = module.full_shape if attr == "weight" else (module.full_shape[0],)
    logical = tensor.shape if isinstance(tensor, GGUFTensor) else tuple(tensor.shape)
    if tuple(logical) != full:
        raise InferError(f"weight {name} has shape {tuple(logical)}, the config implies {full}")
    if isinstance(tensor, GGUFTensor):
        if isinstance(module, (Linear, Embedding)) and attr == "weight":
            module.load(tensor.data, tensor.qtype, device, dtype, packed)
            return
        tensor = quant.reference(tensor.data, tensor.qtype).reshape(tensor.shape)
    if shard is not None and (attr == "weight" or shard.dim == 0):
        tensor = shard.of(tensor)
    setattr(module, attr, torch.nn.Parameter(tensor.contiguous().to(device=device, dtype=dtype), requires_grad=False))
