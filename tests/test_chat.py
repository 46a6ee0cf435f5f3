"""`infer chat`: piped documents as a subprocess with no terminal, and the interactive loop through a pty (pexpect)."""

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import pexpect
import pyte
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
    assert {"prefill_tps", "decode_tps", "stop_reason", "tokens_per_step", "verify_steps", "draft_share", "verify_share",
            "host_share"} <= set(record) and 0 <= record["host_share"] <= 1


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


def test_empty_stdin_is_one_line_error_without_a_question(smollm2, env):
    r = chat(smollm2, stdin=b"", env=env)  # no terminal to reopen either: nothing to do
    assert r.returncode != 0
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer: error:") and "stdin is empty" in lines[0]
    assert not r.stdout
    r = chat(smollm2, "-p", "What is 2+2?", "--max-tokens", "4", stdin=b"", env=env)  # a question needs no document
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


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


def answer_on_screen(output: str, question: str, columns: int, rows: int) -> list[str]:
    """The non-empty lines a terminal shows between the question's line and the stats line, after `output`."""
    screen = pyte.Screen(columns, rows)
    pyte.Stream(screen).feed(output)
    lines = [line.rstrip() for line in screen.display]
    start = max(i for i, line in enumerate(lines) if question in line)
    end = next(i for i in range(start, rows) if lines[i].startswith("prompt "))
    return [line for line in lines[start + 1:end] if line]


@contextlib.contextmanager
def chat_in_terminal(command: str, env, tmp_path):
    """A shell `command` that runs `infer chat`, in a terminal (a pty). After the block, at the prompt, Ctrl-D must
    end it with exit status 0."""
    child = pexpect.spawn("bash", ["-c", command], env=env, cwd=str(tmp_path), timeout=120, encoding="utf-8",
                          dimensions=(40, 200))
    try:
        yield child
        at_prompt(child)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def piped_chat(model, env, tmp_path, document: str, *flags: str):
    """`cat doc.txt | infer chat MODEL --temperature 0 FLAGS` in a terminal: see chat_in_terminal."""
    doc = tmp_path / "doc.txt"
    doc.write_text(document)
    command = f"cat {doc} | {sys.executable} -m infer.cli.main chat {model} --temperature 0 {' '.join(flags)}"
    return chat_in_terminal(command, env, tmp_path)


def test_piped_document_then_questions_from_the_terminal(smollm2, env, tmp_path):
    """`cat doc | infer chat MODEL` in a terminal: the document comes through the pipe, the questions from the
    controlling terminal (/dev/tty, here the pty), which the chat reopens."""
    document = "The secret word is pineapple. The meeting is on Tuesday in room 42.\n"
    with piped_chat(smollm2, env, tmp_path, document, "--max-tokens", "24") as child:
        child.expect_exact("document loaded")
        at_prompt(child)
        child.send("Which room is the meeting in?\r")
        child.expect_exact("meeting in?")  # the echo of the question
        child.expect_exact("42")
        child.expect_exact("tok/s")


def test_piped_document_longer_than_the_context_then_reset(smollm2, env, tmp_path):
    """A piped document too long for the context: each question says so on one line, naming /reset, and after
    /reset the questions are answered without it."""
    document = "The meeting is on Tuesday. " * 40
    with piped_chat(smollm2, env, tmp_path, document, "--max-tokens", "4", "--max-context", "128") as child:
        at_prompt(child)
        child.send("When is the meeting?\r")
        child.expect_exact("error: the input has")
        child.expect_exact("/reset drops the document")
        at_prompt(child)
        child.send("/reset\r")
        child.expect_exact("conversation cleared")
        at_prompt(child)
        child.send("Say hi.\r")
        child.expect_exact("tok/s")


def test_a_conversation_longer_than_the_context_drops_its_oldest_turns(smollm2):
    from infer.cli.chat import Chat
    from infer.engine.generate import Engine

    engine = Engine(smollm2, device="cpu", progress=False, max_context=130)
    chat = Chat(engine, dict(max_tokens=40, temperature=0.0), system="Be brief.",
                document="The secret word is pineapple.")
    out = io.StringIO()
    questions = ["What is the secret word?", "Name a colour.", "Name an animal.", "Name a city.", "And a river?"]
    for q in questions:
        chat.turn(q, out)
        assert engine.stats.generated_tokens > 0
    roles = [m["role"] for m in chat.messages]
    assert roles[0] == "system" and roles[1:] == ["user", "assistant"] * (len(roles) // 2)
    assert len(roles) < 1 + 2 * len(questions)  # turns were dropped ...
    first = chat.messages[1]["content"]
    assert first.startswith("The secret word is pineapple.") and first != "The secret word is pineapple.\n\n" + questions[0]
    assert chat.messages[-2]["content"] == questions[-1]  # ... but not the document, nor the newest question


def test_chat_turns_reuse_the_cached_document(smollm2):
    from infer.cli.chat import Chat
    from infer.engine.generate import Engine

    engine = Engine(smollm2, device="cpu", progress=False)
    chat = Chat(engine, dict(max_tokens=8, temperature=0.0))
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
    command = f"{sys.executable} -m infer.cli.main chat {smollm2} --temperature 0 --max-tokens 400"
    with chat_in_terminal(command, env, tmp_path) as child:
        at_prompt(child)
        child.send("/help\r")
        child.expect_exact("Alt+Enter")
        child.expect_exact("partial answer stays")
        at_prompt(child)
        # a long answer, stopped with Ctrl-C once it streams: back at the prompt with the conversation intact
        child.logfile_read = screen_log = io.StringIO()
        child.send("Write a very long story about a dragon who learns to cook.\r")
        child.expect_exact("learns to cook.")  # the echo of the question
        child.expect(r"\n[^>]*[A-Za-z]{3,} [A-Za-z]{2,} [A-Za-z]{2,}")  # some words of the answer
        child.sendintr()
        child.expect_exact("interrupted")
        at_prompt(child)
        child.logfile_read = None
        answer = answer_on_screen(screen_log.getvalue(), "learns to cook.", 200, 40)
        assert answer and not any(b.startswith(a) for i, a in enumerate(answer) for b in answer[i + 1:]), answer
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
    assert (tmp_path / "home" / "data" / "infer" / "history").exists()
