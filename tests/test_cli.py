"""`infer` as a user runs it: output on stdout, stats on stderr, and one clear line for every kind of bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import random_model_folder



def infer(*args, stdin: bytes = b""):
    return subprocess.run([sys.executable, "-m", "infer.cli.main", *args], input=stdin, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(smollm2, tmp_path_factory):
    """A random two-layer model with the demo model's tokenizer and a 64-token context."""
    return random_model_folder(tmp_path_factory.mktemp("tiny"), smollm2, model_type="llama", vocab_size=49152,
                               hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def broken_copy(tiny, tmp_path, name="m"):
    folder = tmp_path / name
    shutil.copytree(tiny, folder)
    return folder


def assert_one_line_error(result, *words):
    err = result.stderr.decode()
    assert result.returncode != 0 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("infer: error:")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), err


def test_generate_streams_text_to_stdout_and_stats_to_stderr(smollm2):
    result = infer("generate", str(smollm2), "-p", "What is 2+2? Answer with a number.", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr.decode()
    assert "4" in result.stdout.decode()
    assert "tok/s" in result.stderr.decode() and "tok/s" not in result.stdout.decode()


def test_prompt_from_stdin_with_invalid_utf8_is_replaced_with_a_warning(tiny):
    result = infer("generate", str(tiny), "--raw", "--max-tokens", "3", stdin=b"hello \xff\xfe world")
    assert result.returncode == 0, result.stderr.decode()
    assert "not valid UTF-8" in result.stderr.decode()


def test_missing_folder(tmp_path):
    assert_one_line_error(infer("generate", str(tmp_path / "nope"), "-p", "hi"), "nope")


def test_folder_without_config(tiny, tmp_path):
    folder = broken_copy(tiny, tmp_path)
    (folder / "config.json").unlink()
    assert_one_line_error(infer("generate", str(folder), "-p", "hi"), "config.json")


def test_folder_without_weights(tiny, tmp_path):
    folder = broken_copy(tiny, tmp_path)
    (folder / "model.safetensors").unlink()
    assert_one_line_error(infer("generate", str(folder), "-p", "hi"), "no model.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_weights(tiny, tmp_path, keep):
    folder = broken_copy(tiny, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    assert_one_line_error(infer("generate", str(folder), "-p", "hi"), "model.safetensors")


def test_corrupt_weights_header(tiny, tmp_path):
    folder = broken_copy(tiny, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert_one_line_error(infer("generate", str(folder), "-p", "hi"), "model.safetensors")


def test_tensor_with_wrong_shape(tiny, tmp_path):
    folder = broken_copy(tiny, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    assert_one_line_error(infer("generate", str(folder), "-p", "hi"), "shape")


def test_unknown_model_type(tiny, tmp_path):
    folder = broken_copy(tiny, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    assert_one_line_error(infer("generate", str(folder), "-p", "hi"), "gpt_neox", "llama")


def test_prompt_longer_than_the_context(tiny):
    assert_one_line_error(infer("generate", str(tiny), "--raw", "-p", "word " * 200), "context")


def test_unknown_catalogue_name():
    assert_one_line_error(infer("pull", "no-such-model"), "no-such-model")


@pytest.mark.parametrize("widths", ["1", "16", "2,9"])
def test_bench_refuses_verification_widths_the_engine_never_runs(widths):
    assert_one_line_error(infer("bench", "--shape", "smollm2-135m", "--device", "cpu", "--verify", widths), "--verify")


def test_bench_with_sparse_attention_runs_on_cpu_without_the_triton_interpreter():
    """The bench's cache at depth is pooled by the torch reference off CUDA (Triton kernels need a GPU there); the
    summary flags set its summaries (finer ones: more bytes read per token)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["bench", "--shape", "smollm2-135m", "-p", "16", "-n", "2", "-d", "40", "--sparse", "on", "--json",
            "--device", "cpu"]
    rows = {}
    for summaries in ([], ["--summary-size", "16", "--summary-stride", "8"]):
        out = subprocess.run([sys.executable, "-m", "infer.cli.main", *args, *summaries], capture_output=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        rows[len(summaries)] = json.loads(out.stdout)
        assert [(r["test"], r["depth"]) for r in rows[len(summaries)]] == [("pp16", 0), ("tg2", 40)]
    assert rows[4][1]["bytes_per_token"] > rows[0][1]["bytes_per_token"]


def test_bench_skips_the_rows_of_a_zero_count_and_refuses_a_negative_one():
    """-p 0 / -n 0 leave out the prefill / decode rows, as in llama-bench."""
    args = ["bench", "--shape", "smollm2-135m", "--device", "cpu", "--sparse", "off", "--json", "--eager"]
    out = infer(*args, "-p", "0", "-n", "2", "-d", "8")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [(r["test"], r["depth"]) for r in json.loads(out.stdout)] == [("tg2", 8)]
    out = infer(*args, "-p", "8", "-n", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [(r["test"], r["depth"]) for r in json.loads(out.stdout)] == [("pp8", 0)]
    assert_one_line_error(infer("bench", "--shape", "smollm2-135m", "--device", "cpu", "-d", "-1"), "-d")
    assert_one_line_error(infer("bench", "--shape", "smollm2-135m", "--device", "cpu", "-p", "0", "-n", "0"),
                          "nothing to time")


def test_bench_names_a_bad_summary_flag():
    assert_one_line_error(infer("bench", "--shape", "smollm2-135m", "--device", "cpu", "--summary-stride", "0"),
                          "--summary-stride")
    assert_one_line_error(infer("bench", "--attention", "--summary-size", "8", "--summary-stride", "16"),
                          "--summary-stride", "--summary-size")


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "eval"])
def test_sparse_flags_reach_the_sparse_config(command):
    from infer.cli.main import build_parser, sparse_overrides
    from infer.engine.config import sparse_config

    args = build_parser().parse_args([command, "m", "--sparse", "on", "--sparse-topk", "8", "--window", "128",
                                      "--summary-size", "16", "--summary-stride", "8"])
    cfg = sparse_config(None, **sparse_overrides(args))
    assert (cfg.mode, cfg.topk, cfg.window_size, cfg.kernel_size, cfg.kernel_stride) == ("on", 8, 128, 16, 8)
    assert sparse_config(None, **sparse_overrides(build_parser().parse_args([command, "m"]))).kernel_stride == 16
