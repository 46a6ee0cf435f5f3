"""`infer serve` as a client sees it: the official openai client against a server on a free local port."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from infer.engine.tokenizer import Tokenizer

KEY = "test-key"
CONTEXT = 512  # small, so that an oversize prompt is cheap to send
MODEL = "smollm2-135m-instruct"
LONG_ANSWER = [{"role": "user", "content": "Count from one to fifty in words."}]  # runs to max_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder, tmp_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "serve.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "infer.cli.main", "serve", str(folder), "--port", str(self.port),
                 "--max-context", str(CONTEXT), "--queue", "1", "--api-key", KEY], stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while self.health() is None:
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the server did not answer /health"
            time.sleep(0.2)

    def health(self):
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return json.load(r)
        except OSError:
            return None

    def post(self, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(self.url + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def log_lines(self, pattern: str) -> list[re.Match]:
        return list(re.finditer(pattern, self.log.read_text()))


CHAT_PROMPT = "What is the capital of France? Answer in one sentence."
RAW_PROMPT = "The three primary colors are"


class InferGenerate:
    """`infer generate` greedy on one prompt: started at once, read when needed."""

    def __init__(self, folder, prompt: str, *flags: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "infer.cli.main", "generate", str(folder), "-p", prompt, "--max-tokens", "16",
             "--temperature", "0", "--max-context", str(CONTEXT), *flags], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)

    def text(self) -> str:
        out, err = self.process.communicate(timeout=300)
        assert self.process.returncode == 0, err.decode()
        return out.decode()[:-1]  # generate ends the answer with a newline


@pytest.fixture(scope="module")
def generated(smollm2):
    """The answers the server must give, computed while the server starts."""
    return {"chat": InferGenerate(smollm2, CHAT_PROMPT), "raw": InferGenerate(smollm2, RAW_PROMPT, "--raw")}


@pytest.fixture(scope="module")
def server(smollm2, generated, tmp_path_factory):
    server = Server(smollm2, tmp_path_factory.mktemp("serve"))
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return Tokenizer.from_dir(smollm2)


def test_chat_stream_and_non_stream_give_the_text_of_infer_generate(client, generated):
    expected = generated["chat"].text()
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert answer.choices[0].message.content == expected
    usage, timings = answer.usage, answer.model_extra["timings"]
    assert usage.prompt_tokens == timings["prompt_n"] + usage.prompt_tokens_details.cached_tokens
    assert usage.completion_tokens == timings["predicted_n"] > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == answer.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens
    # The same prompt again: all of it but the last token is reused.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_text_completion_gives_the_text_of_infer_generate_raw(client, generated):
    answer = client.completions.create(model=MODEL, prompt=RAW_PROMPT, max_tokens=16, temperature=0)
    assert answer.choices[0].text == generated["raw"].text()


def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_a_shared_document_is_prefilled_once(client, tokenizer):
    document = " ".join(f"In year {1800 + i} the town of Elmsford built {i % 7 + 2} new bridges." for i in range(12))
    questions = ["How many bridges were built in 1805?", "Which town is this about?"]
    conversations = [[{"role": "user", "content": f"{document}\n\n{q}"}] for q in questions]
    answers = [client.chat.completions.create(model=MODEL, messages=m, max_tokens=4, temperature=0)
               for m in conversations]
    first, second = (tokenizer.encode_chat(m) for m in conversations)
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared > len(tokenizer.encode(document, add_special_tokens=False))
    usage, timings = answers[1].usage, answers[1].model_extra["timings"]
    assert usage.prompt_tokens == len(second)
    assert usage.prompt_tokens_details.cached_tokens == timings["cache_n"] == shared
    assert timings["prompt_n"] == len(second) - shared


def test_two_clients_are_served_in_order_and_a_full_queue_answers_429(client):
    """The queue holds one waiting request: while A runs, of B and C sent at once one waits and one gets 429."""
    running = iter(client.chat.completions.create(model=MODEL, messages=LONG_ANSWER, max_tokens=16, temperature=0,
                                                  stream=True))
    next(running)  # A is being generated
    outcomes = {}

    def send(name):
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Hi, {name}"}],
                                           max_tokens=4, temperature=0)
            outcomes[name] = ("answered", time.monotonic())
        except openai.RateLimitError as e:
            outcomes[name] = ("429", e.response.headers["Retry-After"], e.body)

    threads = [threading.Thread(target=send, args=(name,)) for name in "BC"]
    for t in threads:
        t.start()
    rest = list(running)
    a_done = time.monotonic()
    for t in threads:
        t.join(timeout=120)
    assert rest[-1].choices[0].finish_reason == "length"
    assert sorted(o[0] for o in outcomes.values()) == ["429", "answered"], outcomes
    (_, answered_at), = (o for o in outcomes.values() if o[0] == "answered")
    assert answered_at > a_done  # served after A, not beside it (its 4 tokens would have come first)
    (_, retry_after, error), = (o for o in outcomes.values() if o[0] == "429")
    assert int(retry_after) >= 1 and error["code"] == "queue_full"


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server, client):
    stream = client.chat.completions.create(model=MODEL, messages=LONG_ANSWER, max_tokens=16, temperature=0,
                                            stream=True)
    next(iter(stream))
    stream.close()
    after = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
                                           temperature=0)
    assert after.choices[0].message.content
    stopped = server.log_lines(r"generated (\d+) tok[^\n]*\| stopped: interrupted")
    assert len(stopped) == 1 and int(stopped[0][1]) < 16, server.log.read_text()


def chat_body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}).encode()


@pytest.mark.parametrize("path, body, key, status, param", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}', KEY, 400, None),
    ("/v1/chat/completions", chat_body(temperature="hot"), KEY, 400, "temperature"),
    ("/v1/chat/completions", chat_body(max_tokens=1.5), KEY, 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "robot", "content": "Hi"}]), KEY, 400, "messages.0.role"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": 7}]), KEY, 400, "messages.0.content"),
    ("/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode(), KEY, 400, "prompt"),
    ("/v1/chat/completions", chat_body(model="gpt-4o"), KEY, 404, "model"),
    ("/v1/chat/completions", chat_body(), "wrong-key", 401, None),
    ("/v1/chat/completions", chat_body(), None, 401, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, path, body, key, status, param):
    code, answer = server.post(path, body, key)
    assert code == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param
    assert server.health() == {"status": "ok"}


def test_a_prompt_longer_than_the_context_is_a_400_naming_both_lengths(server, client, tokenizer):
    messages = [{"role": "user", "content": "word " * CONTEXT}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True)
    message = error.value.body["message"]
    assert f"{len(tokenizer.encode_chat(messages))} tokens" in message and str(CONTEXT) in message
    assert server.health() == {"status": "ok"}


def test_ctrl_c_stops_the_server_cleanly(server):
    """Last in the module: it stops the shared server."""
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=30) == 0
    log = server.log.read_text()
    assert "Traceback" not in log and "infer serve: stopped" in log
