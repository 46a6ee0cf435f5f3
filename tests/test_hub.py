"""Hugging Face repo ids as MODEL, `infer pull ORG/NAME[:QUANT]` and `infer list`, against a fake hub on 127.0.0.1.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so everything that reaches the hub
runs as the user runs it: an `infer` subprocess with those set (HF_HOME in tmp_path).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from fake_hub import FakeHub, Repo

from infer.engine.errors import InferError
from infer.weights.catalogue import resolve_model
from infer.weights.hub import RepoRef, parse_ref, select_files

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_REPO = "TinyOrg/Tiny-GGUF"
GATED = "TinyOrg/Gated"
NO_WEIGHTS = "TinyOrg/Pickles"
MAIN, V1 = "a" * 40, "b" * 40  # commits: main, and the older one tagged v1.0
TOKEN = "hf_test_token"
ENGINE_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def tiny_gguf(path: Path, split: int = 0) -> Path:
    """A GGUF file with a llama header (2048-token context) and one small tensor."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(2048)
    writer.add_uint16("split.no", split)
    writer.add_tensor("token_embd.weight", np.full((4, 8), split, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def hub(smollm2, tmp_path_factory):
    """The SmolLM2 demo folder as a repo with a v1.0 tag, a GGUF repo, a gated repo and one without usable weights."""
    ggufs = tmp_path_factory.mktemp("gguf")
    smol = {name: smollm2 / name for name in ENGINE_FILES}
    smol.update({"README.md": b"# SmolLM2\n", "onnx/model.onnx": b"onnx", "consolidated.safetensors": b"other format"})
    repos = {
        SMOL: Repo({MAIN: smol, V1: {**smol, "generation_config.json": b'{"eos_token_id": 2}'}},
                   {"main": MAIN, "v1.0": V1}),
        GGUF_REPO: Repo({MAIN: {
            "README.md": b"# Tiny GGUF\n",
            "Tiny-Q4_K_M.gguf": tiny_gguf(ggufs / "q4.gguf"),
            "Tiny-Q8_0-00001-of-00002.gguf": tiny_gguf(ggufs / "q8-1.gguf", split=0),
            "Tiny-Q8_0-00002-of-00002.gguf": tiny_gguf(ggufs / "q8-2.gguf", split=1),
            "mmproj-Tiny-F16.gguf": b"a vision projector",
        }}, {"main": MAIN}),
        GATED: Repo({MAIN: {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"weights"}},
                    {"main": MAIN}, token=TOKEN),
        NO_WEIGHTS: Repo({MAIN: {"config.json": b'{"model_type": "llama"}', "pytorch_model.bin": b"pickle"}},
                         {"main": MAIN}),
    }
    with FakeHub(repos) as fake:
        yield fake


def infer(hub: FakeHub, home: Path, *args, **env):
    """`infer *args` with huggingface_hub pointed at the fake hub and a cache under home."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost",
                no_proxy="127.0.0.1,localhost")  # a proxy the machine may name is not on the way to the fake hub
    return subprocess.run([sys.executable, "-m", "infer.cli.main", *args], capture_output=True, timeout=300,
                          env={**base, **env})


def ok(result) -> str:
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return result.stdout.decode()


def error_line(result) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("infer: error:")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot_files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def cdn_gets(hub: FakeHub) -> list[str]:
    return [r for r in hub.requests if r.startswith("GET /cdn/")]


@pytest.fixture(scope="module")
def smol_home(hub, tmp_path_factory):
    """A Hugging Face cache into which `infer pull` downloaded the SmolLM2 repo; (cache home, printed path)."""
    home = tmp_path_factory.mktemp("hf")
    hub.requests.clear()
    path = Path(ok(infer(hub, home, "pull", SMOL)).strip())
    return home, path, list(hub.requests)


def test_pull_downloads_the_files_the_engine_reads_into_the_cache(hub, smol_home):
    home, path, requests = smol_home
    repo_dir = home / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    assert path == repo_dir / "snapshots" / MAIN
    assert snapshot_files(path) == ENGINE_FILES  # no README, onnx/ or consolidated.safetensors
    assert (repo_dir / "refs" / "main").read_text() == MAIN
    assert len([r for r in requests if r.startswith("GET /cdn/")]) == 1  # model.safetensors, through the CDN


def test_a_cached_repo_runs_without_a_request_and_offline_as_its_folder(hub, smol_home, smollm2):
    home, _, _ = smol_home
    args = ["--raw", "-p", "The capital of France is", "--max-tokens", "8", "--temperature", "0"]
    from_folder = ok(infer(hub, home, "generate", str(smollm2), *args))
    hub.requests.clear()
    from_cache = ok(infer(hub, home, "generate", SMOL, *args))
    assert hub.requests == []
    offline = ok(infer(hub, home, "generate", SMOL, *args, HF_HUB_OFFLINE="1"))
    assert hub.requests == []
    assert from_folder.strip() and from_cache == offline == from_folder


def test_pull_again_asks_the_hub_and_downloads_nothing(hub, smol_home):
    home, path, _ = smol_home
    hub.requests.clear()
    assert Path(ok(infer(hub, home, "pull", SMOL)).strip()) == path
    assert hub.requests and cdn_gets(hub) == []


def test_revision(hub, smol_home):
    home, _, _ = smol_home
    hub.requests.clear()
    path = Path(ok(infer(hub, home, "pull", SMOL, "--revision", "v1.0")).strip())
    assert path.name == V1 and snapshot_files(path) == ENGINE_FILES
    assert json.loads((path / "generation_config.json").read_text()) == {"eos_token_id": 2}
    assert cdn_gets(hub) == []  # the weights are the same blob as main's: linked, not downloaded again
    assert "no revision 'v9'" in error_line(infer(hub, home, "pull", SMOL, "--revision", "v9"))


def test_offline_without_the_cache_is_an_error(hub, tmp_path):
    hub.requests.clear()
    line = error_line(infer(hub, tmp_path, "generate", SMOL, "-p", "hi", HF_HUB_OFFLINE="1"))
    assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert hub.requests == []


def test_quant_picks_its_gguf_file(hub, tmp_path):
    path = Path(ok(infer(hub, tmp_path, "pull", f"{GGUF_REPO}:q4_k_m")).strip())
    assert path.name == "Tiny-Q4_K_M.gguf" and snapshot_files(path.parent) == ["Tiny-Q4_K_M.gguf"]
    path = Path(ok(infer(hub, tmp_path, "pull", f"{GGUF_REPO}:Q8_0")).strip())
    assert path.name == "Tiny-Q8_0-00001-of-00002.gguf"
    assert snapshot_files(path.parent) == ["Tiny-Q4_K_M.gguf", "Tiny-Q8_0-00001-of-00002.gguf",
                                           "Tiny-Q8_0-00002-of-00002.gguf"]


@pytest.mark.parametrize("model, words", [
    (f"{GGUF_REPO}:Q5_K_S", ["no GGUF file for :Q5_K_S", "available: Q4_K_M, Q8_0"]),
    (GGUF_REPO, ["holds GGUF files", f"{GGUF_REPO}:QUANT", "Q4_K_M, Q8_0"]),
    (NO_WEIGHTS, ["no weights infer can load"]),
    ("nobody/nothing", ["no repo nobody/nothing"]),  # 404
    (GATED, ["gated", "HF_TOKEN"]),  # 401 without the token
])
def test_repo_errors(hub, tmp_path, model, words):
    line = error_line(infer(hub, tmp_path, "pull", model))
    assert all(w in line for w in words), line


def test_gated_repo_with_its_token(hub, tmp_path):
    path = Path(ok(infer(hub, tmp_path, "pull", GATED, HF_TOKEN=TOKEN)).strip())
    assert snapshot_files(path) == ["config.json", "model.safetensors"]


def test_list_shows_folders_and_cached_models_and_skips_unreadable_ones(hub, smol_home, smollm2, tmp_path):
    home, _, _ = smol_home
    models = tmp_path / "models"
    (models / "junk").mkdir(parents=True)
    (models / "junk" / "config.json").write_text("[]")
    (models / smollm2.name).symlink_to(smollm2)
    for quant in ("Q4_K_M", "Q8_0"):
        ok(infer(hub, home, "pull", f"{GGUF_REPO}:{quant}"))
    broken = home / "hub" / "models--broken--repo"
    (broken / "snapshots" / MAIN).mkdir(parents=True)
    (broken / "snapshots" / MAIN / "config.json").write_text("{not json")
    (broken / "refs").mkdir()
    (broken / "refs" / "main").write_text(MAIN)
    out = ok(infer(hub, home, "list", INFER_WEIGHTS_DIR=str(models)))
    q4 = home / "hub" / "models--TinyOrg--Tiny-GGUF" / "snapshots" / MAIN / "Tiny-Q4_K_M.gguf"
    q4_size = f"{q4.stat().st_size} B"
    rows = {tuple(cell.strip() for cell in line.split("│")[1:-1]) for line in out.splitlines() if "│" in line}
    assert {("smollm2-135m-instruct", "", "llama", "8192", "272.6 MB"), (SMOL, "main", "llama", "8192", "272.6 MB"),
            (f"{GGUF_REPO}:Q4_K_M", "main", "llama", "2048", q4_size)} <= rows
    assert {row[0] for row in rows} - {SMOL} == {"smollm2-135m-instruct", f"{GGUF_REPO}:Q4_K_M", f"{GGUF_REPO}:Q8_0"}


def test_list_without_models_says_where_it_looked(hub, tmp_path):
    out = ok(infer(hub, tmp_path, "list", INFER_WEIGHTS_DIR=str(tmp_path / "models")))
    assert out.startswith(f"no models in {tmp_path / 'models'} and the Hugging Face cache {tmp_path / 'hub'}")


def test_select_files():
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    files = ["README.md", "config.json", "consolidated.safetensors", "tokenizer.json", *shards]
    assert select_files(RepoRef("o/n"), files) == ["config.json", "tokenizer.json", *shards]
    ggufs = ["m.q4_k_m.gguf", "M-UD-Q4_K_XL.gguf", "mmproj-M-F16.gguf", "M-F16-00001-of-00003.gguf",
             "M-F16-00002-of-00003.gguf", "M-F16-00003-of-00003.gguf"]
    assert select_files(RepoRef("o/n", "Q4_K_M"), ggufs) == ["m.q4_k_m.gguf"]
    assert select_files(RepoRef("o/n", "ud-q4_k_xl"), ggufs) == ["M-UD-Q4_K_XL.gguf"]
    assert select_files(RepoRef("o/n", "F16"), ggufs) == ggufs[3:]  # the split model, not the projector
    with pytest.raises(InferError, match="2 of the 3 parts"):
        select_files(RepoRef("o/n", "F16"), ggufs[:-1])


def test_parse_ref():
    assert parse_ref("Qwen/Qwen2.5-0.5B-Instruct") == RepoRef("Qwen/Qwen2.5-0.5B-Instruct")
    assert parse_ref("bartowski/Qwen2.5-7B-GGUF:Q4_K_M") == RepoRef("bartowski/Qwen2.5-7B-GGUF", "Q4_K_M")
    assert parse_ref("smollm2-135m-instruct") is None and parse_ref("/abs/path") is None and parse_ref("a/b/c") is None


def test_a_local_folder_comes_before_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model("org/name") == Path("org/name")
    with pytest.raises(InferError, match="--revision goes with a Hugging Face repo id"):
        resolve_model("org/name", revision="v1")
