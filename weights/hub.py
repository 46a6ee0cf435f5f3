"""Models from the Hugging Face Hub: a repo id `ORG/NAME[:QUANT]` is looked up in the local Hugging Face cache first
and downloaded with huggingface_hub when it is not there. huggingface_hub itself honours HF_TOKEN, HF_HUB_OFFLINE,
HF_HOME / HF_HUB_CACHE and HF_ENDPOINT.

`ORG/NAME` names a repo of safetensors weights: its config, generation config, tokenizer files and `model*.safetensors`
(with the shard index) are fetched, and the snapshot folder is the model. `ORG/NAME:QUANT` names one GGUF file of a
GGUF repo (case insensitive: `:q4_k_m` picks `Model-Q4_K_M.gguf` or `model.Q4_K_M.gguf`, every part of a split
`-00001-of-0000N.gguf`), and the path of that file (of its first part) is the model.
"""

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from infer.engine.errors import InferError

# The files of a safetensors repo the engine reads (engine/config.py, engine/tokenizer.py, engine/weights.py).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "chat_template.jinja", "model.safetensors.index.json")
WEIGHT_PATTERN = "model*.safetensors"  # model.safetensors or its shards model-00001-of-0000N.safetensors
INDEX_FILE = "model.safetensors.index.json"

REPO_ID = re.compile(r"([\w.-]+/[\w.-]+)(?::([\w.-]+))?")
SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})$")  # after the stem of a split GGUF's part


@dataclass(frozen=True)
class RepoRef:
    repo_id: str  # ORG/NAME
    quant: str | None = None  # the GGUF quant tag after ':', e.g. Q4_K_M

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.quant}" if self.quant else self.repo_id


def parse_ref(text: str) -> RepoRef | None:
    """ORG/NAME or ORG/NAME:QUANT as a RepoRef; None when text has another form."""
    m = REPO_ID.fullmatch(text)
    return RepoRef(m[1], m[2]) if m else None


def resolve(ref: RepoRef, revision: str | None = None, update: bool = False) -> Path:
    """The model folder (or GGUF file) of ref at revision (default: the main branch).

    The cache answers first, without a request, unless `update` asks the Hub for what changed; when the cache lacks
    the model it is downloaded, except in offline mode (HF_HUB_OFFLINE=1).
    """
    if not update or constants.HF_HUB_OFFLINE:
        found = cached(ref, revision)
        if found is not None:
            return found
        if constants.HF_HUB_OFFLINE:
            raise InferError(f"{ref} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                             "is set: download it once online (infer pull)")
    return download(ref, revision)


def cached(ref: RepoRef, revision: str | None) -> Path | None:
    """ref in the Hugging Face cache, complete, or None. The cache keeps a snapshot folder per commit and a file
    refs/<branch or tag> naming the commit; a file appears in the snapshot only once fully downloaded."""
    repo_dir = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
    revision = revision or constants.DEFAULT_REVISION
    ref_file = repo_dir / "refs" / revision
    try:
        commit = ref_file.read_text().strip() if ref_file.is_file() else revision
        snapshot = repo_dir / "snapshots" / commit
        files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
        wanted = select_files(ref, files)
    except (OSError, ValueError, InferError):  # unreadable, no such snapshot, or not the files wanted
        return None
    if not ref.quant and not has_weights(snapshot):
        return None
    return model_path(snapshot, ref, wanted)


def download(ref: RepoRef, revision: str | None) -> Path:
    """Fetch the files of ref at revision into the Hugging Face cache (resuming what is there) and return its path."""
    with hub_errors(ref, revision):
        info = HfApi().model_info(ref.repo_id, revision=revision)
        wanted = select_files(ref, [s.rfilename for s in info.siblings or []])
        snapshot = Path(snapshot_download(ref.repo_id, revision=revision, allow_patterns=wanted))
    return model_path(snapshot, ref, wanted)


def select_files(ref: RepoRef, files: list[str]) -> list[str]:
    """The files of a repo listing that ref needs: the GGUF file(s) of its quant, else the safetensors model's."""
    if ref.quant:
        return gguf_files(ref, files)
    weights = [f for f in files if fnmatchcase(f, WEIGHT_PATTERN)]
    if not weights:
        quants = gguf_quants(files)
        if quants:
            raise InferError(f"{ref.repo_id} holds GGUF files: pick one as {ref.repo_id}:QUANT; available: "
                             f"{', '.join(quants)}")
        raise InferError(f"{ref.repo_id} has no weights infer can load: expected model.safetensors (or its shards) "
                         "or GGUF files")
    return [f for f in files if f in MODEL_FILES or f in weights]


def gguf_files(ref: RepoRef, files: list[str]) -> list[str]:
    """The GGUF file of ref.quant in a listing, or all parts of a split one, first part first."""
    stems = {}  # stem (file name without .gguf and split suffix) -> its files
    for f in files:
        stem = gguf_stem(f)
        if stem and re.search(rf"(^|[-.]){re.escape(ref.quant)}$", stem.rsplit("/", 1)[-1], re.IGNORECASE):
            stems.setdefault(stem, []).append(f)
    if not stems:
        raise InferError(f"{ref.repo_id} has no GGUF file for :{ref.quant}; available: "
                         f"{', '.join(gguf_quants(files)) or 'none'}")
    if len(stems) > 1:
        raise InferError(f"{ref} matches several GGUF files: {', '.join(sorted(stems))}")
    parts = sorted(next(iter(stems.values())))
    count = SPLIT_PART.search(parts[0][:-5])
    if count and len(parts) != int(count[2]):
        raise InferError(f"{ref}: {len(parts)} of the {int(count[2])} parts of the split GGUF are there")
    return parts


def gguf_stem(path: str) -> str | None:
    """The path of a model GGUF file without .gguf and a split suffix; None for other files and projectors."""
    name = path.rsplit("/", 1)[-1]
    if not name.lower().endswith(".gguf") or name.lower().startswith("mmproj"):
        return None
    return SPLIT_PART.sub("", path[:-5])


def gguf_quants(files: list[str]) -> list[str]:
    """The quant tags of a listing's GGUF files: the last '-' or '.' separated word of each stem."""
    stems = {gguf_stem(f) for f in files} - {None}
    return sorted({re.split(r"[-.]", stem.rsplit("/", 1)[-1])[-1] for stem in stems}, key=str.lower)


def has_weights(folder: Path) -> bool:
    """Whether folder holds a config and complete safetensors weights (every shard its index names)."""
    if not (folder / "config.json").is_file():
        return False
    if (folder / INDEX_FILE).is_file():
        try:
            shards = set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        return all((folder / shard).is_file() for shard in shards)
    return (folder / "model.safetensors").is_file()


def model_path(snapshot: Path, ref: RepoRef, wanted: list[str]) -> Path:
    return snapshot / wanted[0] if ref.quant else snapshot


@contextmanager
def hub_errors(ref: RepoRef, revision: str | None):
    """Turns what huggingface_hub raises into one-line InferErrors that say what to do."""
    repo, hub = ref.repo_id, constants.ENDPOINT
    try:
        yield
    except InferError:
        raise
    except GatedRepoError:
        raise InferError(f"{repo} is gated: accept its terms at {hub}/{repo} and set HF_TOKEN to a token of that "
                         "account") from None
    except RepositoryNotFoundError:
        raise InferError(f"no model folder {repo} here and no repo {repo} on the Hugging Face Hub ({hub}); "
                         "a private repo needs HF_TOKEN") from None
    except RevisionNotFoundError:
        raise InferError(f"{repo} has no revision {revision!r}") from None
    except HFValidationError:
        raise InferError(f"{repo!r} is not a valid Hugging Face repo id") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "error"
        hint = ": check HF_TOKEN" if status in (401, 403) else ""
        raise InferError(f"the Hugging Face Hub answered HTTP {status} for {repo}{hint}") from None
    except Exception as e:  # the HTTP client's connection and timeout errors (its own classes), a failed write
        cause = e.__cause__ or e
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise InferError(f"cannot download {repo} from {hub}: {reason}") from None
