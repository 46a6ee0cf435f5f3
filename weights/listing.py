"""`infer list`: the models on this machine, as MODEL names: the folders in the models folder and the Hugging Face
cache's models the engine reads (a supported config.json beside safetensors weights, or GGUF files)."""

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from infer.engine.config import SUPPORTED_MODEL_TYPES
from infer.engine.gguf import field, open_gguf
from infer.engine.errors import InferError
from infer.weights import hub
from infer.weights.catalogue import models_dir


@dataclass(frozen=True)
class LocalModel:
    name: str  # what to pass as MODEL
    revision: str  # the branches or tags naming a cached repo's snapshot (else its short commit); "" for a folder
    architecture: str  # config.json's model_type, or the GGUF's general.architecture
    context: int | None  # max_position_embeddings, or the GGUF's context_length; None when not given
    size: int  # bytes on disk


def local_models() -> list[LocalModel]:
    """Every readable model in the models folder (catalogue GGUF files and folders), then in the Hugging Face cache;
    anything unreadable is left out."""
    folder = models_dir()
    found = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.is_dir():
            found.append(folder_model(p.name, "", p))
        elif p.suffix == ".gguf":
            found.append(gguf_model(p.stem, "", [p]))
    return [m for m in found if m is not None] + cached_models()


def cached_models() -> list[LocalModel]:
    try:
        cache = scan_cache_dir()  # skips (and reports in its warnings) what does not have the cache's layout
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            label = ", ".join(sorted(rev.refs)) or rev.commit_hash[:12]
            files = sorted(f.file_path.relative_to(rev.snapshot_path).as_posix() for f in rev.files)
            found.append(folder_model(repo.repo_id, label, rev.snapshot_path))
            for quant in hub.gguf_quants(files):
                ref = hub.RepoRef(repo.repo_id, quant)
                try:
                    parts = [rev.snapshot_path / f for f in hub.gguf_files(ref, files)]
                except InferError:  # an incomplete split GGUF
                    continue
                found.append(gguf_model(str(ref), label, parts))
    return [m for m in found if m is not None]


def folder_model(name: str, revision: str, folder: Path) -> LocalModel | None:
    """folder as a model of the engine, or None when it has no supported config.json or no complete weights."""
    try:
        config = json.loads((folder / "config.json").read_text())
        size = folder_size(folder)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        return None
    if not hub.has_weights(folder):
        return None
    return LocalModel(name, revision, config["model_type"], config.get("max_position_embeddings"), size)


def gguf_model(name: str, revision: str, parts: list[Path]) -> LocalModel | None:
    """A GGUF model of one file or several parts, or None when unreadable."""
    try:
        reader = open_gguf(parts[0])
        architecture = field(reader, "general.architecture")
        context = field(reader, f"{architecture}.context_length", None)
        size = sum(p.stat().st_size for p in parts)
    except (InferError, OSError):
        return None
    return LocalModel(name, revision, architecture, context, size)


def folder_size(folder: Path) -> int:
    """Bytes of the files under folder (a cache snapshot's files are links to its blobs: their targets count)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def cache_folder() -> Path:
    return Path(constants.HF_HUB_CACHE)
