"""Tensor parallelism on the CPU (gloo): `--tp N` generates what one process generates, for the Qwen demo and for
random models of each architecture (sparse on and off, lookup on), and evaluates what it evaluates; `infer bench`
times a split model; a rank that dies takes the group down fast."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import random_model_folder

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
ARCHITECTURES = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),  # q/k/v biases
    "qwen3": dict(model_type="qwen3", head_dim=16),  # q/k norms
    "minicpm": dict(model_type="minicpm", scale_emb=2.0, scale_depth=1.4, dim_model_base=32, tie_word_embeddings=True),
}
PROMPT = "Once upon a time, in a land far away, there lived a king who loved stories. " * 4


def infer(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "infer.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def models(smollm2, tmp_path_factory):
    return {name: random_model_folder(tmp_path_factory.mktemp(name), smollm2, **{**TINY, **config})
            for name, config in ARCHITECTURES.items()}


def generate(model, tp: int, *flags) -> str:
    r = infer("generate", str(model), "--raw", "-p", PROMPT, "--max-tokens", "12", "--temperature", "0",
              "--tp", str(tp), *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("name, tp, flags", [
    ("llama", 2, ["--sparse", "on", "--sparse-topk", "2", "--block-size", "16", "--window", "16"]),
    ("llama", 4, ["--no-lookup"]),
    ("qwen2", 2, ["--lookup"]),
    ("qwen3", 2, []),
    ("minicpm", 4, ["--sparse", "on", "--sparse-topk", "2", "--block-size", "16", "--window", "16"]),
])
def test_tensor_parallel_generates_what_one_process_generates(models, name, tp, flags):
    assert generate(models[name], tp, *flags) == generate(models[name], 1, *flags)


def test_the_qwen_demo_split_in_two(qwen):
    """Its two KV heads, one a rank: the same greedy text as one process."""
    args = ["-p", "Write a Python function that adds two numbers.", "--max-tokens", "16", "--temperature", "0"]
    one, two = infer("generate", str(qwen), *args), infer("generate", str(qwen), *args, "--tp", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and len(one.stdout) > 20


def test_torchrun_starts_the_ranks_and_all_of_them_end_cleanly(models):
    """Every rank runs the command, --tp read from the environment; the follower stops when rank 0 is done."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "infer.cli.main",
                        "generate", str(models["llama"]), "--raw", "-p", PROMPT, "--max-tokens", "12",
                        "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "infer: error" not in r.stderr, r.stderr[-2000:]
    assert r.stdout == generate(models["llama"], 1)


def test_eval_split_in_two_scores_what_one_process_scores(models):
    """Both of eval's engines (dense, and sparse as a variant over the same model) replayed by the follower."""
    args = ["eval", str(models["llama"]), "--lengths", "200", "--depths", "0.5", "--nll-tokens", "300",
            "--dense-len", "64", "--sparse", "auto", "--sparse-topk", "2", "--block-size", "16", "--window", "16",
            "--answer-tokens", "4", "--json"]
    one, two = (infer(*args, "--tp", tp) for tp in ("1", "2"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    one, two = json.loads(one.stdout), json.loads(two.stdout)
    assert two["passkey"] == one["passkey"] and one["passkey"][0]["sparse_attention"] == "sparse"
    for key in ("dense_all", "sparse_all", "dense_long", "sparse_long", "dense_causal", "sparse_causal"):
        assert two["nll"][key] == pytest.approx(one["nll"][key], rel=1e-5), key
    assert one["nll"]["diff_long"] != 0  # the sparse engine really is another one than the dense


def test_bench_split_in_two_prints_the_table(models):
    """Each rank builds its slice and times the same rows (a rank missing from a pass would hang it); rank 0 prints."""
    r = infer("bench", str(models["llama"]), "--device", "cpu", "-p", "16", "-n", "2", "-d", "0,20", "--verify", "3",
              "--sparse", "on", "--tp", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tensor-parallel over 2" in r.stdout
    rows = [line.split("│")[1:3] for line in r.stdout.splitlines() if line.startswith("│")]
    assert [(test.strip(), depth.strip()) for test, depth in rows] == [
        ("pp16", "0"), ("tg2", "0"), ("tg2", "20"), ("v3", "0"), ("v3", "20")]


@pytest.mark.parametrize("command", [["generate", "-p", "hi", "--tp", "3"],  # 4 KV heads
                                     ["bench", "--tp", "3"],
                                     ["bench", "--attention", "--tp", "2"]])  # one attention layer, one GPU
def test_a_split_the_engine_cannot_take_is_a_one_line_error(models, command):
    r = infer(command[0], str(models["llama"]), *command[1:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("infer: error:")]
    assert r.returncode == 1 and len(errors) == 1 and "--tp" in errors[0] and "Traceback" not in r.stderr, r.stderr


def test_a_rank_that_dies_stops_the_group(models):
    """A follower killed mid-generation: rank 0 says so on one line and exits within seconds, not a hang."""
    child = subprocess.Popen([sys.executable, "-m", "infer.cli.main", "generate", str(models["llama"]), "--raw",
                              "-p", PROMPT, "--max-tokens", "400", "--tp", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        followers = []
        deadline = time.monotonic() + 120
        while not followers and time.monotonic() < deadline:  # the follower is rank 0's spawned child
            time.sleep(0.5)
            out = subprocess.run(["pgrep", "-P", str(child.pid)], capture_output=True, text=True).stdout.split()
            followers = [int(pid) for pid in out]
        assert followers, "no follower process"
        assert child.stdout.read(1)  # the answer streams: the ranks are generating
        os.kill(followers[-1], signal.SIGKILL)
        killed = time.monotonic()
        child.wait(timeout=30)
        assert time.monotonic() - killed < 10
    finally:
        child.kill()
    stderr = child.stderr.read()
    assert child.returncode == 1 and "tensor-parallel rank" in stderr and "Traceback" not in stderr, stderr
