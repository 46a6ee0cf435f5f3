"""`infer chat`: a terminal chat over one Engine, optionally about piped or named documents.

The CLI only parses, renders and keeps the message list; the Engine reuses the cached prefix of each turn.
"""

import contextlib
import io
import json
import os
import signal
import sys
import termios
from pathlib import Path

from rich.console import Console

from infer.engine.errors import ContextOverflow, InferError

DEFAULT_REQUEST = "Summarize the document above."
PROMPT = ">>> "

HELP = """\
Enter sends the message; Esc then Enter (or Alt+Enter) inserts a newline.
Ctrl-C while an answer streams stops it: the partial answer stays in the conversation.
Ctrl-C at the prompt clears the line; Ctrl-D (or /exit) quits.

/help          this help
/reset         forget the conversation (and any document); keep the system message
/system TEXT   set the system message (no TEXT: show it)
/stats         the last turn's stats
/save FILE     save the messages as JSON
/load FILE     load messages saved by /save
/exit          quit"""


def read_document_file(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InferError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        print(f"infer: warning: {path} is not valid UTF-8; invalid bytes were replaced", file=sys.stderr)
        return data.decode("utf-8", errors="replace")


def history_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "infer" / "history"


class PrefillBar:
    """A transient rich progress bar on stderr, fed by Engine.generate's on_progress(done, total)."""

    def __init__(self, enabled: bool):
        self.enabled, self.progress, self.task = enabled, None, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or done >= total and self.progress is None:
            return
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("prefill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("prefill", total=total)
        self.progress.update(self.task, completed=done)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class MarkdownView:
    """A streaming answer in a terminal: the tail that fits the screen, live; then the whole of it as markdown."""

    def __init__(self, out):
        from rich.live import Live

        self.console = Console(file=out)
        self.live = Live(console=self.console, transient=True, refresh_per_second=15, vertical_overflow="crop")
        self.live.start()

    def update(self, text: str) -> None:
        from rich.markdown import Markdown

        tail = text.splitlines()[-max(1, self.console.height - 2):]
        self.live.update(Markdown("\n".join(tail)))

    def close(self, text: str) -> None:
        from rich.markdown import Markdown

        self.live.stop()
        if text:
            self.console.print(Markdown(text))


@contextlib.contextmanager
def no_echo(terminal):
    """The terminal `terminal` (a file; None, or not a terminal: nothing to do) echoes no keys meanwhile. Live
    displays pad each line to the terminal's width, so an echoed key (Ctrl-C's "^C", type-ahead) would wrap the
    cursor to a new line and the live region would no longer be erased: the partial answer then showed twice. Keys
    typed meanwhile wait for the next prompt."""
    try:
        fd = terminal.fileno() if terminal is not None and terminal.isatty() else None
    except (OSError, ValueError, io.UnsupportedOperation):
        fd = None
    if fd is None:
        yield
        return
    attrs = termios.tcgetattr(fd)
    quiet = list(attrs)
    quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)  # the local modes
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, attrs)


class Interrupts:
    """Ctrl-C during a turn. While the answer streams, a press only sets `pressed`, which the turn checks after each
    piece: no KeyboardInterrupt can land inside the live display or the bookkeeping after it. Before that (the
    prefill), the first press raises KeyboardInterrupt at once, which leaves the engine consistent (the cache keeps
    the chunks that finished); with `at_once` False (tensor parallelism: the ranks must finish a pass together) it
    is raised between prefill chunks (`check`). Later presses in the same turn are ignored."""

    def __init__(self, at_once: bool = True):
        self.pressed = self.streaming = False
        self.at_once = at_once

    def check(self) -> None:
        """Between prefill chunks: stop there once Ctrl-C was pressed."""
        if self.pressed and not self.streaming:
            raise KeyboardInterrupt

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._on_press)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def _on_press(self, signum, frame):
        if self.pressed:
            return
        self.pressed = True
        if not self.streaming and self.at_once:
            raise KeyboardInterrupt


class Chat:
    def __init__(self, engine, sampling: dict, system: str | None = None, document: str | None = None,
                 stats_file=None):
        """sampling: overrides of the model's sampling defaults (SamplingParams fields); stats_file: a text file
        that gets one JSON object of stats per turn."""
        self.engine = engine
        self.params = engine.sampling_params(**sampling)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.document = document  # prefixed to the first question kept in the conversation
        self.stats_file = stats_file
        self.err = Console(stderr=True, highlight=False)
        self.stats_line = ""

    def set_system(self, text: str) -> None:
        if self.messages and self.messages[0]["role"] == "system":
            self.messages[0]["content"] = text
        else:
            self.messages.insert(0, {"role": "system", "content": text})

    def reset(self) -> None:
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.document = None
        self.engine.reset()

    def fit(self, messages: list[dict], room: int) -> tuple[list[int], int]:
        """The tokens of `messages` (a copy: it is trimmed in place), dropping the oldest question-answer pairs until
        they leave `room` tokens for the answer; the system message, the document (carried to the next question) and
        the newest question stay. Returns the tokens and how many pairs were dropped; raises ContextOverflow when
        even the newest question alone does not fit."""
        first = 1 if messages and messages[0]["role"] == "system" else 0
        dropped = 0
        tokens = self.engine.tokenizer.encode_chat(messages)
        while len(tokens) + room > self.engine.max_len and len(messages) - first >= 3:
            oldest = messages.pop(first)
            if messages[first]["role"] == "assistant":
                messages.pop(first)
            if self.document and oldest["content"].startswith(self.document):  # the document moves on
                messages[first] = {**messages[first], "content": self.document + "\n\n" + messages[first]["content"]}
            dropped += 1
            tokens = self.engine.tokenizer.encode_chat(messages)
        if len(tokens) >= self.engine.max_len:
            raise ContextOverflow(len(tokens), self.engine.max_len, self.engine.model_context)
        return tokens, dropped  # with less room than asked, the answer stops at "context full"

    def turn(self, user_text: str, out, markdown: bool = False) -> str:
        """Ask `user_text` after the conversation so far (after the document, on the first question); stream the
        answer to `out`; return the stop reason.

        markdown: show the streaming tail live and print the whole answer rendered as markdown at the end (a
        terminal); else write the raw text as it comes (pipes). When the conversation no longer fits, the oldest
        turns are dropped (saying so). Ctrl-C keeps the partial answer. Any error leaves the conversation as it was."""
        asked = not any(m["role"] == "user" for m in self.messages)
        content = self.document + "\n\n" + user_text if self.document is not None and asked else user_text
        messages = self.messages + [{"role": "user", "content": content}]
        room = min(self.params.max_tokens, self.engine.max_len // 4)
        tokens, dropped = self.fit(messages, room)
        if dropped:
            turns = "turn was" if dropped == 1 else f"{dropped} turns were"
            self.err.print(f"(the conversation outgrew the {self.engine.max_len}-token context: the oldest {turns} "
                           f"dropped)", style="dim", soft_wrap=True)
        bar = PrefillBar(sys.stderr.isatty())
        view = None
        pieces: list[str] = []
        with Interrupts(at_once=self.engine.parallel is None) as ctrl_c, no_echo(out if markdown else None):

            def progress(done: int, total: int) -> None:
                bar(done, total)
                ctrl_c.check()

            stream = self.engine.generate(tokens, self.params, on_progress=progress)
            try:
                for piece in stream:
                    if not ctrl_c.streaming:
                        bar.close()
                        view = MarkdownView(out) if markdown else None
                        ctrl_c.streaming = True
                    pieces.append(piece)
                    if view:
                        view.update("".join(pieces))
                    else:
                        out.write(piece)
                        out.flush()
                    if ctrl_c.pressed:
                        break
            except KeyboardInterrupt:  # during the prefill
                pass
            finally:
                stream.close()  # stops the engine at this token ("interrupted" unless it had stopped already)
                bar.close()
            answer = "".join(pieces)
            if view:
                view.close(answer)
            elif pieces:
                out.write("\n")
                out.flush()
            interrupted = ctrl_c.pressed
        stats = self.engine.stats
        if interrupted and not answer:
            self.err.print("(interrupted)", style="dim")
            return "interrupted"  # nothing to keep: as if the question was never asked
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.stats_line = stats.line()
        self.err.print(self.stats_line, style="dim", soft_wrap=True)
        if self.stats_file:
            self.stats_file.write(json.dumps(stats.record()) + "\n")
            self.stats_file.flush()
        return stats.stop_reason

    # ---- interactive ----

    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        say = lambda text: self.err.print(text, soft_wrap=True, markup=False)
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            say(HELP)
        elif name == "/reset":
            self.reset()
            say("(conversation cleared)")
        elif name == "/system":
            if rest:
                self.set_system(rest)
                say("(system message set)")
            else:
                current = self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None
                say(current if current is not None else "(no system message)")
        elif name == "/stats":
            turns = sum(m["role"] == "user" for m in self.messages)
            say(f"{self.stats_line or '(no turn yet)'}\n{turns} turns; {len(self.engine.tokens)} of {self.engine.max_len} context tokens cached")
        elif name == "/save":
            if not rest:
                say("usage: /save FILE")
            else:
                try:
                    Path(rest).write_text(json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                    say(f"(saved {len(self.messages)} messages to {rest})")
                except OSError as e:
                    say(f"cannot write {rest}: {e.strerror or e}")
        elif name == "/load":
            if not rest:
                say("usage: /load FILE")
            else:
                try:
                    messages = json.loads(Path(rest).read_text(encoding="utf-8"))
                    if not isinstance(messages, list) or not all(
                            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in messages):
                        raise ValueError("expected a JSON list of {\"role\", \"content\"} objects")
                    self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
                    say(f"(loaded {len(messages)} messages from {rest})")
                except (OSError, ValueError) as e:
                    say(f"cannot load {rest}: {getattr(e, 'strerror', None) or e}")
        else:
            say(f"unknown command {name}; /help lists them")
        return True

    def interactive(self, session) -> None:
        """Read questions (and slash commands) from `session` until Ctrl-D or /exit. An error in a turn is shown on
        one line and the conversation goes on as it was."""
        from infer.cli.main import error_message, internal_error, is_out_of_memory

        out = sys.stdout
        say = lambda text: self.err.print(text, soft_wrap=True, markup=False, style="dim")
        if self.document is not None:
            say(f"(document loaded: {len(self.document)} characters; it goes with your first message)")
        say("(/help for commands, Ctrl-D to quit)")
        while True:
            try:
                line = session.prompt(PROMPT)
            except KeyboardInterrupt:
                continue
            except EOFError:
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            try:
                reason = self.turn(text, out, markdown=out.isatty())
            except InferError as e:
                hint = ""
                if isinstance(e, ContextOverflow) and self.document is not None and not any(
                        m["role"] == "user" for m in self.messages):  # every question would carry the document
                    hint = "; /reset drops the document"
                self.err.print(f"error: {error_message(e)}{hint}", soft_wrap=True, markup=False)
                continue
            except Exception as e:
                if os.environ.get("INFER_DEBUG"):
                    raise
                problem = "out of memory" if is_out_of_memory(e) else f"internal error ({internal_error(e)})"
                self.err.print(f"error: {problem}; the conversation is kept", soft_wrap=True, markup=False)
                continue
            if reason == "context full":
                say("(the context is full: the next question drops the oldest turns, /reset clears them)")


def make_session(tty=None):
    """A prompt-toolkit session: Enter sends, Esc+Enter / Alt+Enter inserts a newline; history in the data dir.
    tty: open_tty()'s files, when stdin is not the terminal (a piped document)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(path))
    except OSError:
        history = InMemoryHistory()
    extra = {}
    if tty is not None:
        from prompt_toolkit.input import create_input
        from prompt_toolkit.output import create_output

        tty_in, tty_out = tty
        extra = dict(input=create_input(stdin=tty_in), output=create_output(stdout=tty_out))
    return PromptSession(history=history, key_bindings=bindings, multiline=False, **extra)


def open_tty():
    """The controlling terminal as (input, output) text files, or None without one. Two files: a terminal is not
    seekable, so one text file opened for reading and writing ('r+') would fail."""
    try:
        return open("/dev/tty", encoding="utf-8"), open("/dev/tty", "w", encoding="utf-8")
    except OSError:
        return None


def open_stats_file(path: str | None):
    if path is None:
        return None
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as e:
        raise InferError(f"cannot write --stats-json {path}: {e.strerror or e}") from None


def cmd_chat(args) -> None:
    from infer.cli.main import load_engine, read_stdin, sampling_overrides

    documents = [read_document_file(f) for f in args.file or []]
    if args.file and not "".join(documents).strip():
        raise InferError("the --file documents are empty")
    if not args.file and not sys.stdin.isatty():
        text = read_stdin()
        if text.strip():
            documents.append(text)
        elif args.prompt is None:
            raise InferError("stdin is empty: pipe a document in (cat doc.txt | infer chat MODEL), or run in a terminal")
    document = "\n\n".join(documents) if documents else None
    sampling = sampling_overrides(args)  # checked, as the stats file is opened, before the model loads
    stats_file = open_stats_file(args.stats_json)

    tty = None
    interactive = args.prompt is None and sys.stdin.isatty()
    if args.prompt is None and not sys.stdin.isatty():
        tty = open_tty()
        interactive = tty is not None
    chat = Chat(load_engine(args), sampling, args.system, document, stats_file)
    if interactive:
        chat.interactive(make_session(tty))
        return
    chat.turn(args.prompt if args.prompt is not None else DEFAULT_REQUEST, sys.stdout)
