"""Careless and hostile input: every case ends in an answer or in one `infer: error:` line, never a traceback, a hang
or a file read outside the model folder. Property-based (hypothesis) over the model folder's JSON files and the
sampling flags, plus the cases found by hand."""

import contextlib
import io
import json
import shutil
import signal

import pytest
import torch
from conftest import random_model_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infer.cli.main import main
from infer.engine import memory
from infer.engine.config import ModelConfig
from infer.engine.errors import InferError, ParameterError

TINY = dict(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
CASE_SECONDS = 60  # a case that takes longer hangs (the slowest legitimate one, a 1024-layer config, takes ~2 s)
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tiny(smollm2, tmp_path_factory):
    return random_model_folder(tmp_path_factory.mktemp("tiny"), smollm2, **TINY)


def run(*argv) -> tuple[int, str, str]:
    """`infer ARGV` in this process: (exit code, stdout, stderr); a case that runs too long fails the test."""
    out, err = io.StringIO(), io.StringIO()

    def hang(signum, frame):
        raise TimeoutError(f"infer {' '.join(argv)} took over {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue()


def assert_answer_or_one_line_error(code: int, out: str, err: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("infer: error:")]
    if code == 0:
        assert "stopped:" in err and not errors, err
    else:
        assert code in (1, 2) and len(errors) == 1, err
        assert "internal error" not in errors[0] and "Traceback" not in err, err


def generate(folder, *flags):
    return run("generate", str(folder), "--raw", "-p", "Once upon a time", "--max-tokens", "3", *flags)


def with_files(tiny, tmp_path, **files) -> str:
    """A copy of the tiny folder with files replaced: a name maps to a JSON value, or to raw text (str)."""
    folder = tmp_path / "m"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tiny, folder)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / name.replace("__", ".")).write_text(text)
    return folder


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10 ** 8) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
               "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id",
               "sparse_config", "scale_emb")


def mutated(base: dict, keys) -> st.SearchStrategy:
    """`base` with some of `keys` set to arbitrary JSON values (or dropped), sometimes not an object at all."""
    changes = st.dictionaries(st.sampled_from(keys), JSON | st.just("<drop>"), max_size=4)
    edited = changes.map(lambda c: {k: v for k, v in {**base, **c}.items() if v != "<drop>"})
    return st.one_of(edited, edited, edited, JSON)


@FUZZ
@given(config=mutated(TINY, CONFIG_KEYS))
def test_fuzzed_config_json(tiny, tmp_path_factory, config):
    folder = with_files(tiny, tmp_path_factory.mktemp("c"), config__json=config)
    assert_answer_or_one_line_error(*generate(folder))


GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample", "eos_token_id")


@FUZZ
@given(generation=mutated({"do_sample": True, "temperature": 0.7, "top_p": 0.9}, GENERATION_KEYS))
def test_fuzzed_generation_config_json(tiny, tmp_path_factory, generation):
    folder = with_files(tiny, tmp_path_factory.mktemp("g"), generation_config__json=generation)
    assert_answer_or_one_line_error(*generate(folder, "--seed", "0"))


TOKENIZER_KEYS = ("chat_template", "bos_token", "eos_token", "pad_token", "added_tokens_decoder", "add_bos_token")
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"


@FUZZ
@given(tokenizer=mutated({"chat_template": TEMPLATE, "eos_token": "<|im_end|>"}, TOKENIZER_KEYS),
       template=st.text(max_size=40))
def test_fuzzed_tokenizer_config_json(tiny, tmp_path_factory, tokenizer, template):
    if isinstance(tokenizer, dict) and "chat_template" not in tokenizer:
        tokenizer["chat_template"] = template  # arbitrary template text too
    folder = with_files(tiny, tmp_path_factory.mktemp("t"), tokenizer_config__json=tokenizer)
    code, out, err = run("generate", str(folder), "-p", "Hello", "--max-tokens", "2")
    assert_answer_or_one_line_error(code, out, err)


NUMBER = st.sampled_from(["0", "1", "-1", "0.5", "2", "nan", "inf", "-inf", "1e9", "x", ""])
SAMPLING_FLAGS = ("--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--seed",
                  "--max-tokens", "--stop", "--max-context", "--sparse-topk", "--block-size", "--window",
                  "--dense-len", "--summary-size", "--summary-stride", "--draft-tokens")


@FUZZ
@given(flags=st.dictionaries(st.sampled_from(SAMPLING_FLAGS), NUMBER, max_size=4))
def test_fuzzed_sampling_flags(tiny, flags):
    argv = [x for flag, value in flags.items() for x in (flag, value)]
    if "--max-tokens" not in flags:
        argv += ["--max-tokens", "3"]
    assert_answer_or_one_line_error(*run("generate", str(tiny), "--raw", "-p", "Once upon a time", *argv))


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "0.7", "--top-p", "0"], ["--top-p"]),
    (["--min-p", "1.5"], ["--min-p"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--top-k", "-1"], ["--top-k"]),
    (["--repetition-penalty", "0"], ["--repetition-penalty"]),
    (["--stop", ""], ["--stop"]),
    (["--draft-tokens", "0"], ["--draft-tokens"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--max-context", "-5"], ["--max-context"]),
    (["--max-context", "200000"], ["--max-context", "64"]),
    (["--block-size", "48"], ["--block-size"]),
    (["--summary-size", "8", "--summary-stride", "16"], ["--summary-stride", "--summary-size"]),
    (["--summary-size", "0"], ["--summary-size"]),
    (["--max-tokens", "0"], ["--max-tokens"]),
])
def test_bad_flag_values_name_the_flag(tiny, flags, words):
    code, out, err = generate(tiny, *flags)
    assert_answer_or_one_line_error(code, out, err)
    assert code != 0 and all(w in err for w in words), err


@pytest.mark.parametrize("config, words", [
    ([1, 2], ["config.json", "JSON object"]),
    ({"hidden_size": None}, ["hidden_size"]),
    ({"max_position_embeddings": 1e7}, ["max_position_embeddings", "integer"]),
    ({"num_hidden_layers": 100000}, ["num_hidden_layers", "range"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["rope_scaling", "low_freq_factor"]),
])
def test_bad_config_values_name_the_field(tiny, tmp_path, config, words):
    content = config if isinstance(config, list) else {**TINY, **config}
    code, out, err = generate(with_files(tiny, tmp_path, config__json=content))
    assert_answer_or_one_line_error(code, out, err)
    assert code == 1 and all(w in err for w in words), err


def test_bad_generation_config_names_the_file_and_field(tiny, tmp_path):
    code, out, err = generate(with_files(tiny, tmp_path, generation_config__json={"temperature": "hot"}))
    assert code == 1 and "generation_config.json" in err and "temperature" in err, err


@pytest.mark.parametrize("shard", ["/etc/passwd", "../../../etc/passwd", "../outside/model.safetensors",
                                   "sub/../../x.safetensors"])
def test_shard_index_cannot_name_files_outside_the_folder(tiny, tmp_path, shard):
    folder = with_files(tiny, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(folder / "model.safetensors", outside / "model.safetensors")  # loadable, were it read
    index = {"weight_map": {"model.embed_tokens.weight": shard, "model.norm.weight": "model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out, err = generate(folder)
    assert code == 1 and "outside the model folder" in err and repr(shard) in err, err


def test_the_prompt_must_have_tokens(tiny):
    code, out, err = run("generate", str(tiny), "--raw", "-p", "", "--max-tokens", "2")
    assert code == 1 and "no tokens" in err, err


def test_memory_is_sized_before_anything_is_allocated(monkeypatch):
    """The KV cache is fitted to the free memory, or refused with the numbers; the weights alone too."""
    cfg = ModelConfig.from_dict({**TINY, "max_position_embeddings": 1 << 20})
    need = memory.model_memory(cfg, 10_000_000, torch.float32, 4096, None)
    free = need.weights + need.work + need.per_token * 100_000 + memory.SLACK_BYTES
    monkeypatch.setattr(memory, "free_memory", lambda device: free / memory.USABLE)
    cpu = torch.device("cpu")
    fitted, note = memory.fit_context([need], cpu, None, 1 << 20)
    assert 0 < 100_000 - fitted < memory.CONTEXT_STEP and "1048576" in note
    assert memory.fit_context([need], cpu, 5000, 1 << 20) == (5000, "")
    with pytest.raises(ParameterError, match="enough for 100000 tokens") as e:
        memory.fit_context([need], cpu, 200_000, 1 << 20)
    assert e.value.name == "max_context"
    with pytest.raises(ParameterError, match="beyond the model's context"):
        memory.fit_context([need], cpu, 2 << 20, 1 << 20)
    monkeypatch.setattr(memory, "free_memory", lambda device: need.weights / 2)
    with pytest.raises(InferError, match="the weights need"):
        memory.fit_context([need], cpu, None, 1 << 20)
