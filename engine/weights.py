"""Load safetensors checkpoints (single file or sharded) tensor by tensor onto the target device and dtype."""

from pathlib import Path, PurePosixPath

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open

from .config import ModelConfig, read_json_object
from .errors import InferError
from .model import Transformer

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


def load_model(path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
               progress: bool = True) -> Transformer:
    """Build the model of `cfg` (the folder's config) on the meta device, then fill it one tensor at a time from the
    memory-mapped checkpoint."""
    path = Path(path)
    files = checkpoint_files(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.named_parameters())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ckpt_name, file in files.items():
        name = ckpt_name.removeprefix("model.")
        if name in expected:
            by_file.setdefault(file, []).append((ckpt_name, name))
    found = {name for pairs in by_file.values() for _, name in pairs}
    missing = [n for n in expected if n not in found]
    if missing:
        raise InferError(f"{path} lacks the weight {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))

    with Progress(
        TextColumn("loading weights"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
        disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task("load", total=len(found))
        for file, pairs in by_file.items():
            try:
                with safe_open(file, "pt") as f:
                    for ckpt_name, name in pairs:
                        tensor = f.get_tensor(ckpt_name)
                        _assign(model, name, tensor, expected[name].shape, device, dtype)
                        bar.advance(task)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise InferError(f"cannot read weights from {file.name}: the file is truncated or corrupt ({e})") from None
    model.setup(device)
    return model


def _assign(model: Transformer, name: str, tensor: torch.Tensor, shape: torch.Size, device, dtype) -> None:
    if tensor.shape != shape:
        raise InferError(f"weight {name} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}")
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
