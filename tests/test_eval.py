"""Block-sparse against dense attention on the real demo model (CPU sizes): passkey answers, log-likelihood, `infer eval`.

The long runs (8K-32K tokens) are for the GPU: `infer eval qwen2.5-coder-0.5b-instruct` (see its --help).
"""

import json
import subprocess
import sys

import pytest
from conftest import random_model_folder

from infer.engine.measure import eval as quality
from infer.engine.generate import Engine
from infer.engine.tokenizer import Tokenizer

# Small enough that a 1K-token document drops most of its blocks: 6 blocks of 64 (sink and window included).
SPARSE = dict(mode="on", topk=6, window_size=192, block_size=64, dense_len=384)


@pytest.fixture(scope="module")
def engines(qwen):
    dense = Engine(qwen, device="cpu", sparse={"mode": "off"}, max_context=1536, progress=False)
    sparse = Engine(qwen, device="cpu", sparse=SPARSE, max_context=1536, progress=False)
    return dense, sparse


def test_passkey_prompt_is_deterministic_and_sized_in_tokens(qwen):
    tokenizer = Tokenizer.from_dir(qwen)
    case = quality.passkey_case(tokenizer, 700, 0.5, seed=3)
    again = quality.passkey_case(tokenizer, 700, 0.5, seed=3)
    assert case.tokens == again.tokens and case.key == again.key
    assert 690 <= len(case.tokens) <= 700
    text = tokenizer.decode(case.tokens)
    assert text.count(case.key) == 2 and sum(c.isdigit() for c in text) == 10  # the key twice, no other digits
    assert 0.4 < case.needle_at / len(case.tokens) < 0.6
    assert quality.passkey_case(tokenizer, 700, 0.5, seed=4).tokens != case.tokens
    shallow, deep = (quality.passkey_case(tokenizer, 700, d, seed=3).needle_at for d in (0.0, 1.0))
    assert shallow < 80 and deep > 620


def test_sparse_passkey_answers_equal_dense_while_reading_part_of_the_cache(engines):
    dense, sparse = engines
    rows = quality.run_passkey(dense, sparse, [1024], [0.2, 0.6], seed=0, answer_tokens=8)
    for row in rows:
        assert row.tokens - row.needle_at > SPARSE["window_size"] + 64  # the needle is outside the local window
        assert row.dense_correct, row
        assert row.sparse == row.dense, row
        assert row.sparse_attention == "sparse" and row.kv_read < 0.5, row


def test_sparse_log_likelihood_is_close_to_dense_but_not_equal(engines):
    dense, sparse = engines
    result = quality.run_nll(*engines, 1024)
    assert "common-licenses" in result.source or "pydoc" in result.source
    assert result.boundary == 384 and result.long_predictions == 1023 - 384
    assert result.sparse_predictions == 1023  # mode "on": every chunk takes the sparse path
    assert result.kv_read_long < 0.65  # blocks really are dropped (measured: 56% read) ...
    assert result.diff_long != 0.0  # ... and that changes the predictions, so this test could fail
    assert abs(result.diff_all) < 0.1 and abs(result.diff_long) < 0.15  # measured: +0.011 and +0.018 nats
    assert result.top1_agree_long > 0.8  # measured: 0.90
    assert 1.0 < result.dense_all < 3.0  # the text is natural language the model predicts well


def infer(*args):
    return subprocess.run([sys.executable, "-m", "infer.cli.main", *args], capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(qwen, tmp_path_factory):
    """A random two-layer qwen2 model with the demo model's tokenizer and chat template: the CLI runs in seconds."""
    return random_model_folder(tmp_path_factory.mktemp("tiny-qwen"), qwen, model_type="qwen2", vocab_size=151936,
                               hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


def test_cli_eval_json(tiny):
    result = infer("eval", str(tiny), "--device", "cpu", "--lengths", "300,500", "--depths", "0.1,0.9",
                   "--nll-tokens", "400", "--sparse", "auto", "--dense-len", "128", "--sparse-topk", "3", "--window", "64",
                   "--answer-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    assert out["device"] == "cpu" and out["dtype"] == "float32"
    assert out["sparse"]["mode"] == "auto" and out["sparse"]["topk"] == 3 and out["sparse"]["dense_len"] == 128
    rows = out["passkey"]
    assert [(r["length"], r["depth"]) for r in rows] == [(300, 0.1), (300, 0.9), (500, 0.1), (500, 0.9)]
    for r in rows:
        assert r["tokens"] <= r["length"] and r["sparse_attention"] == "sparse" and 0 < r["kv_read"] <= 1
        assert r["equal"] == (r["dense"] == r["sparse"]) and r["dense_correct"] == (r["key"] in r["dense"])
    nll = out["nll"]
    assert nll["tokens"] == 400 and nll["boundary"] == 128 and nll["sparse_predictions"] == 399 - 128
    assert nll["diff_all"] == pytest.approx(nll["sparse_all"] - nll["dense_all"])
    assert nll["diff_long"] != 0 and nll["kv_read_long"] < 1  # blocks were dropped
    assert result.stderr.decode().count("passkey ") == 4  # progress goes to stderr


def test_cli_eval_table(tiny):
    result = infer("eval", str(tiny), "--device", "cpu", "--lengths", "200", "--depths", "0.5", "--nll-tokens", "300",
                   "--sparse-topk", "2", "--window", "32", "--dense-len", "64", "--answer-tokens", "3")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "passkey retrieval" in out and "dense answer" in out and "equal answers" in out
    assert "mean NLL per token" in out and "at positions >= 64" in out and "sparse - dense" in out
    assert "common-licenses" in out or "pydoc_data" in out  # the text is named


@pytest.mark.parametrize("args, words", [
    (["--lengths", "40000"], ["40000", "1024"]),
    (["--lengths", "1000", "--max-context", "1004"], ["1000", "1004"]),
    (["--depths", "1.5"], ["depths", "1.5"]),
    (["--depths", "nan"], ["depths", "nan"]),
    (["--answer-tokens", "5000"], ["--answer-tokens", "5000", "1024"]),
    (["--max-context", "-1"], ["--max-context", "-1"]),
    (["--max-context", "5000"], ["--max-context", "5000", "1024"]),
    (["--lengths", "60"], ["60 tokens", "no room"]),
    (["--lengths", "", "--nll-tokens", "0"], ["nothing to evaluate"]),
    (["--sparse", "off"], ["--sparse off"]),
])
def test_cli_eval_bad_input_is_one_line_before_loading(tiny, args, words):
    result = infer("eval", str(tiny), "--device", "cpu", *args)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("infer: error:")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), err
