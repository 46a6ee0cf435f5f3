"""`infer chat`: piped documents as a subprocess with no terminal, and the interactive loop through a pty (pexpect)."""

import io
import json
import os
import subprocess
import sys
import time

import pexpect
import pytest

DOC = b"The secret word is pineapple. The capital of Italy is Rome.\n"


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "PROMPT_TOOLKIT_NO_CPR": "1",
            "TERM": "xterm", "NO_COLOR": "1"}


def chat(model, *args, stdin: bytes = b"", env=None):
    """Run `infer chat` with stdin a pipe and no controlling terminal (a new session: /dev/tty cannot be opened)."""
    return subprocess.run([sys.executable, "-m", "infer.cli.main", "chat", str(model), "--temperature", "0", *args],
                          input=stdin, capture_output=True, timeout=300, env=env, start_new_session=True)


def test_piped_document_with_question(smollm2, env, tmp_path):
    stats = tmp_path / "stats.jsonl"
    r = chat(smollm2, "-p", "What is the capital of Italy?", "--max-tokens", "12", "--stats-json", str(stats),
             stdin=DOC, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # the answer, and nothing else
    assert b"tok/s" not in r.stdout and b"tok/s" in r.stderr
    record = json.loads(stats.read_text().splitlines()[0])
    assert record["prompt_tokens"] > 0 and record["generated_tokens"] > 0
    assert {"prefill_tps", "decode_tps", "stop_reason"} <= set(record)


def test_non_utf8_document_warns(smollm2, env):
    r = chat(smollm2, "-p", "What is it?", "--max-tokens", "4", stdin=b"caf\xe9 \xff menu\n", env=env)
    assert r.returncode == 0, r.stderr
    assert b"not valid UTF-8" in r.stderr


def test_files_without_question_get_a_summary(smollm2, env, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_bytes(DOC)
    r = chat(smollm2, "-f", str(doc), "-f", str(doc), "--max-tokens", "4", stdin=b"", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and b"tok/s" in r.stderr


def test_empty_stdin_is_one_line_error(smollm2, env):
    r = chat(smollm2, "-p", "What?", stdin=b"", env=env)
    assert r.returncode != 0
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer: error:") and "stdin is empty" in lines[0]
    assert not r.stdout


def test_document_longer_than_context_is_one_line_error(smollm2, env):
    r = chat(smollm2, "-p", "What?", "--max-context", "64", stdin=b"word " * 200, env=env)
    assert r.returncode != 0
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer: error:") and "context" in lines[0]
    assert "Traceback" not in r.stderr.decode()


def at_prompt(child) -> None:
    """Wait for the prompt, and for prompt-toolkit to put the terminal in raw mode (else Ctrl-D is lost)."""
    child.expect_exact(">>>")
    time.sleep(0.3)


def test_chat_turns_reuse_the_cached_document(smollm2):
    from argparse import Namespace

    from infer.cli.chat import Chat
    from infer.engine.generate import Engine

    engine = Engine(smollm2, device="cpu", progress=False)
    args = Namespace(max_tokens=8, temperature=0.0, top_p=None, top_k=None, min_p=None, repetition_penalty=None,
                     seed=None, stop=None, stats_json=None)
    chat = Chat(engine, args, system=None)
    out = io.StringIO()
    chat.turn(DOC.decode() * 20 + "\nWhat is the secret word?", out)
    document_tokens = engine.stats.prompt_tokens
    chat.turn("And the capital of Italy?", out)
    second = out.getvalue().split("\n")[-2]
    assert engine.stats.reused_tokens > document_tokens > 10 * engine.stats.prompt_tokens  # only the new turn ran
    conversation = engine.tokenizer.encode_chat(chat.messages[:-1])
    engine.reset()
    fresh = "".join(engine.generate(conversation, engine.sampling_params(max_tokens=8, temperature=0.0)))
    assert fresh == second


def test_interactive_session(smollm2, env, tmp_path):
    child = pexpect.spawn(sys.executable, ["-m", "infer.cli.main", "chat", str(smollm2), "--temperature", "0",
                                           "--max-tokens", "400"], env=env, cwd=str(tmp_path), timeout=120,
                          encoding="utf-8", dimensions=(40, 200))
    try:
        at_prompt(child)
        child.send("/help\r")
        child.expect_exact("Alt+Enter")
        child.expect_exact("partial answer stays")
        at_prompt(child)
        # a long answer, stopped with Ctrl-C once it streams: back at the prompt with the conversation intact
        child.send("Write a very long story about a dragon who learns to cook.\r")
        child.expect_exact("learns to cook.")  # the echo of the question
        child.expect(r"\n[^>]*[A-Za-z]{3,} [A-Za-z]{2,} [A-Za-z]{2,}")  # some words of the answer
        child.sendintr()
        child.expect_exact("interrupted")
        at_prompt(child)
        child.send("/stats\r")
        child.expect_exact("1 turns;")  # the interrupted turn is kept with its partial answer
        at_prompt(child)
        child.send("What is the capital of France? Answer in one word.\r")
        child.expect_exact("tok/s")
        at_prompt(child)
        child.send("/save conv.json\r")
        child.expect_exact("saved")
        at_prompt(child)
        saved = json.loads((tmp_path / "conv.json").read_text())
        assert [m["role"] for m in saved] == ["user", "assistant"] * 2
        assert saved[1]["content"] and saved[3]["content"]
        child.send("/reset\r")
        child.expect_exact("conversation cleared")
        at_prompt(child)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "home" / "data" / "infer" / "history").exists()
