"""`infer serve`: an OpenAI-compatible HTTP server over one Engine.

One worker thread owns the Engine and runs the requests one at a time, in arrival order, from a bounded queue; the
ASGI side (Starlette on uvicorn) parses and validates requests, queues them and renders the engine's text pieces as
JSON or Server-Sent Events. The engine tokenizes, generates, counts, and keeps its KV cache between requests, so a
request that starts like the previous one (the same document, a new question) prefills only what follows.
"""

import asyncio
import hmac
import json
import math
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from infer.engine.errors import ContextOverflow, InferError, ParameterError
from infer.engine.sampling import SamplingParams

# The engine's stop reasons as OpenAI's finish_reason.
FINISH_REASONS = {"end of turn": "stop", "stop string": "stop", "max tokens": "length", "context full": "length"}


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


GONE = APIError(499, "the client closed the connection")  # the answer to a request whose client went away: unread


# ---- request bodies: the one place request fields are validated ----

def _string_list(value):
    """`stop`: a string stands for a list of one."""
    if isinstance(value, str):
        return [value]
    if value is None or isinstance(value, list):
        return value
    raise PydanticCustomError("string_or_list", "Input should be a string or a list of strings")


def _text_parts(value):
    """A message's `content`: a string stands for one text part."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        return value
    raise PydanticCustomError("string_or_list", "Input should be a string or a list of text parts")


class _Strict(BaseModel):
    """Fields of the wrong type are errors (no "1" for 1); fields this server does not know are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Annotated[list[TextPart], BeforeValidator(_text_parts)]  # a string, or a list of text parts

    def text(self) -> str:
        return "".join(part.text for part in self.content)


class GenerationRequest(_Strict):
    """The fields both endpoints share: the model, streaming, and the sampling settings."""

    kind: ClassVar[str]  # "chat" or "completion", for the log
    id_prefix: ClassVar[str]
    object: ClassVar[str]  # of the whole answer
    chunk_object: ClassVar[str]  # of a streamed chunk

    model: str | None = None  # None: the one model served
    stream: bool = False
    stream_options: StreamOptions | None = None
    # The sampling fields' types; their ranges are the engine's (sampling.check_sampling), checked in complete()
    max_tokens: int | None = None  # None: until the answer ends or the context is full
    temperature: float | None = None  # None: the model's generation_config, else greedy
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Annotated[list[str] | None, BeforeValidator(_string_list)] = None  # a string or a list of them
    n: int = Field(1, ge=1, le=1)  # one answer per request

    def token_limit(self) -> int | None:
        return self.max_tokens

    def limit_field(self) -> str:
        """The field that token_limit comes from."""
        return "max_tokens"


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: a raw prompt, no chat template."""

    kind = "completion"
    id_prefix = "cmpl"
    object = chunk_object = "text_completion"

    prompt: str

    def encode(self, tokenizer) -> list[int]:
        return tokenizer.encode(self.prompt)

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def delta(self, text: str, finish: str | None) -> dict:
        return self.choice(text, finish)


class ChatRequest(GenerationRequest):
    """POST /v1/chat/completions: messages rendered through the model's chat template."""

    kind = "chat"
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def limit_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def encode(self, tokenizer) -> list[int]:
        return tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in self.messages])

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def delta(self, text: str, finish: str | None) -> dict:
        """A streamed piece (with the role, as OpenAI's first chunk has it), or the closing chunk's empty delta."""
        return {"index": 0, "delta": {} if finish else {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}


def parse(body: bytes, kind: type[GenerationRequest]) -> GenerationRequest:
    """The request body as `kind`, or a 400 naming the first field that is wrong."""
    try:
        return kind.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None) from None


# ---- the worker that owns the Engine ----

class Cancelled(Exception):
    """Raised from the prefill's progress callback when the client went away."""


@dataclass
class Job:
    """One request on its way through the worker; the worker reports to it through `events` (on the event loop):
    ("piece", str) for each piece of text, then ("done", Stats) or ("error", APIError); ("cancelled", None) is put
    there when the client goes away."""

    request: ChatRequest | CompletionRequest
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value=None) -> None:
        """From the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def cancel(self) -> None:
        """On the event loop: stop the job at its next piece (or prefill chunk), or skip it if still queued."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.events.put_nowait(("cancelled", None))

    def check(self, done: int, total: int) -> None:
        """The prefill's progress callback: stops a long prefill between chunks once the client is gone."""
        if self.cancelled.is_set():
            raise Cancelled


class Worker:
    """The one thread that uses the Engine: it runs queued jobs one at a time, in arrival order."""

    def __init__(self, engine, queue_size: int):
        self.engine = engine
        self.jobs: queue.Queue[Job] = queue.Queue(queue_size)  # the waiting jobs, not the running one
        self.last_seconds = 1.0  # how long the last job took: the basis of Retry-After
        self.served = 0
        threading.Thread(target=self._run, name="infer-engine", daemon=True).start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            retry = math.ceil(self.last_seconds * (self.jobs.maxsize + 1))
            raise APIError(429, f"the server is busy: {self.jobs.maxsize} requests are waiting (--queue); retry "
                                f"in about {retry} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(retry)}) from None

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if not job.cancelled.is_set():
                start = time.perf_counter()
                self._serve(job)
                self.last_seconds = time.perf_counter() - start

    def _serve(self, job: Job) -> None:
        self.served += 1
        label = f"infer serve: {job.request.kind} {self.served}"
        try:
            stream = self.engine.generate(job.request.encode(self.engine.tokenizer), job.params, job.check)
            try:
                for piece in stream:
                    job.emit("piece", piece)
                    if job.cancelled.is_set():
                        break
            finally:
                stream.close()  # stops the generation and rolls the cache back to what the answer reached
            stats = replace(self.engine.stats)
            job.emit("done", stats)
            log(f"{label}: {stats.line()}")
        except Cancelled:
            log(f"{label}: the client went away during the prefill")
        except ContextOverflow as e:
            job.emit("error", APIError(400, str(e), param="messages", code="context_length_exceeded"))
            log(f"{label}: {e}")
        except InferError as e:  # the chat template rejects the messages
            job.emit("error", APIError(400, str(e)))
            log(f"{label}: {e}")
        except Exception as e:  # a bug: answered 500 and logged; the next request is served
            job.emit("error", APIError(500, f"internal error: {e}", type="server_error"))
            log(f"{label}: internal error\n{traceback.format_exc()}")


def log(line: str) -> None:
    sys.stderr.write(line + "\n")  # one write: the access log's lines come from another thread
    sys.stderr.flush()


# ---- the HTTP side ----

def timings(stats) -> dict:
    """llama-server's `timings`, plus first_token_ms, the attention path and the speculative drafters."""
    return {
        "cache_n": stats.reused_tokens,
        "prompt_n": stats.prompt_tokens,
        "prompt_ms": stats.prefill_seconds * 1000,
        "prompt_per_token_ms": stats.prefill_seconds * 1000 / stats.prompt_tokens if stats.prompt_tokens else 0.0,
        "prompt_per_second": stats.prefill_tps,
        "predicted_n": stats.generated_tokens,
        "predicted_ms": stats.decode_seconds * 1000,  # after the first token, as predicted_per_second
        "predicted_per_token_ms": 1000 / stats.decode_tps if stats.decode_tps else 0.0,
        "predicted_per_second": stats.decode_tps,
        "first_token_ms": stats.first_token_seconds * 1000,
        "attention": stats.attention,
        "kv_read": stats.kv_read,
        "speculative": stats.speculative,
        "draft_n": stats.drafted_tokens,
        "draft_n_accepted": stats.accepted_tokens,
    }


def usage(stats) -> dict:
    prompt = stats.prompt_tokens + stats.reused_tokens
    return {"prompt_tokens": prompt, "completion_tokens": stats.generated_tokens,
            "total_tokens": prompt + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens}}


async def job_events(job: Job, request: Request) -> AsyncIterator[tuple[str, object]]:
    """The job's events up to its end; the job is cancelled as soon as the client disconnects."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "cancelled":
                return
            yield kind, value
            if kind != "piece":
                return
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once the job is done


class Server:
    def __init__(self, engine, model_id: str, names: set[str], api_key: str | None, queue_size: int):
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.names = names | {model_id}  # what a request's `model` may say
        self.worker = Worker(engine, queue_size)
        self.started = int(time.time())
        self.app = Starlette(
            routes=[Route("/health", self.health), Route("/v1/models", self.models),
                    Route("/v1/chat/completions", self.chat, methods=["POST"]),
                    Route("/v1/completions", self.completions, methods=["POST"])],
            exception_handlers={APIError: self.api_error, HTTPException: self.http_error, Exception: self.crash})

    async def api_error(self, request, e: APIError):
        return e.response()

    async def http_error(self, request, e: HTTPException):  # unknown path, wrong method
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                        type="not_found_error" if e.status_code == 404 else "invalid_request_error",
                        headers=e.headers).response()

    async def crash(self, request, e: Exception):
        return APIError(500, f"internal error: {e}", type="server_error").response()

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                                "key given to --api-key", type="authentication_error", code="invalid_api_key")

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.started, "owned_by": "infer",
             "max_context": self.engine.max_len}]})

    async def chat(self, request: Request):
        return await self.complete(request, ChatRequest)

    async def completions(self, request: Request):
        return await self.complete(request, CompletionRequest)

    async def complete(self, request: Request, kind: type[GenerationRequest]):
        self.authorize(request)
        req = parse(await request.body(), kind)
        if req.model is not None and req.model not in self.names:
            raise APIError(404, f"model: {req.model!r} is not served here; this server serves {self.model_id!r}",
                           type="not_found_error", param="model", code="model_not_found")
        engine = self.engine
        try:
            params = engine.sampling_params(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                            min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                                            seed=req.seed, stop=req.stop, max_tokens=req.token_limit() or engine.max_len)
        except ParameterError as e:
            field = req.limit_field() if e.name == "max_tokens" else e.name
            raise APIError(400, f"{field}: {e.problem}", param=field) from None
        job = Job(req, params, asyncio.get_running_loop())
        self.worker.submit(job)
        head = {"id": f"{req.id_prefix}-{uuid.uuid4().hex}", "object": req.chunk_object if req.stream else req.object,
                "created": int(time.time()), "model": self.model_id}
        events = job_events(job, request)
        if req.stream:
            try:
                first = await anext(events)  # an error before any text keeps its status code
            except StopAsyncIteration:
                return GONE.response()
            if first[0] == "error":
                await events.aclose()
                raise first[1]
            return StreamingResponse(self.sse(req, head, first, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = []
        async with aclosing(events):
            async for event, value in events:
                if event == "error":
                    raise value
                if event == "piece":
                    pieces.append(value)
                else:
                    finish = FINISH_REASONS.get(value.stop_reason)
                    return JSONResponse({**head, "choices": [req.choice("".join(pieces), finish)],
                                         "usage": usage(value), "timings": timings(value)})
        return GONE.response()

    async def sse(self, req: GenerationRequest, head: dict, first, events) -> AsyncIterator[str]:
        """The answer as Server-Sent Events: a chunk per piece, a closing chunk with the finish reason and the
        timings, the usage chunk when asked for, then [DONE]."""

        def chunk(**fields) -> str:
            return f"data: {json.dumps({**head, **fields})}\n\n"

        async with aclosing(events):
            event, value = first
            while event == "piece":
                yield chunk(choices=[req.delta(value, None)])
                try:
                    event, value = await anext(events)
                except StopAsyncIteration:  # the client went away
                    return
            if event == "error":
                yield f"data: {json.dumps(value.body())}\n\n"
            else:
                yield chunk(choices=[req.delta("", FINISH_REASONS.get(value.stop_reason))], timings=timings(value))
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk(choices=[], usage=usage(value))
            yield "data: [DONE]\n\n"


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before the model loads, so that a taken port fails at once."""
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        raise InferError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    return sock


def cmd_serve(args) -> None:
    import uvicorn

    from infer.cli.main import load_engine

    if args.queue < 1:
        raise InferError("--queue must be at least 1")
    sock = listen(args.host, args.port)
    engine = load_engine(args)
    model_id = engine.model_dir.name
    server = Server(engine, model_id, {args.model}, args.api_key or os.environ.get("INFER_API_KEY"), args.queue)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    log(f"infer serve: {model_id} at {url}/v1 (OpenAI API), {engine.max_len} tokens of context, "
        f"{args.queue} requests may wait")
    try:  # no startup or shutdown handlers: lifespan off, else Ctrl-C cancels its wait with a traceback
        uvicorn.Server(uvicorn.Config(server.app, log_level="info", lifespan="off")).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on (unless SIGINT was ignored)
        pass
    log("infer serve: stopped")
