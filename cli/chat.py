"""`infer chat`: a terminal chat over one Engine, optionally about piped or named documents.

The CLI only parses, renders and keeps the message list; the Engine reuses the cached prefix of each turn.
"""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from infer.engine.errors import InferError

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


class Chat:
    def __init__(self, engine, args, system: str | None):
        self.engine, self.args = engine, args
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.err = Console(stderr=True, highlight=False)
        self.params = None
        self.stats_line = ""

    def set_system(self, text: str) -> None:
        if self.messages and self.messages[0]["role"] == "system":
            self.messages[0]["content"] = text
        else:
            self.messages.insert(0, {"role": "system", "content": text})

    def reset(self) -> None:
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.engine.reset()

    def turn(self, user_text: str, out, markdown: bool = False) -> str:
        """Ask `user_text` after the conversation so far; stream the answer to `out`; return the stop reason.

        markdown: show the streaming tail live and print the whole answer rendered as markdown at the end (a
        terminal); else write the raw text as it comes (pipes). Ctrl-C while streaming keeps the partial answer;
        an input that overflows the context raises InferError with the conversation left as it was."""
        from infer.cli.main import sampling_overrides

        if self.params is None:
            self.params = self.engine.sampling_params(**sampling_overrides(self.args))
        self.messages.append({"role": "user", "content": user_text})
        tokens = self.engine.tokenizer.encode_chat(self.messages)
        bar = PrefillBar(sys.stderr.isatty())
        view = MarkdownView(out) if markdown else None
        pieces: list[str] = []
        stream = self.engine.generate(tokens, self.params, on_progress=bar)
        try:
            for piece in stream:
                bar.close()
                pieces.append(piece)
                if view:
                    view.update("".join(pieces))
                else:
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            stream.close()
            self.engine.stats.stop_reason = "interrupted"
        except InferError:
            self.messages.pop()
            raise
        finally:
            bar.close()
            if view:
                view.close("".join(pieces))
        answer = "".join(pieces)
        if not view:
            out.write("\n")
            out.flush()
        stats = self.engine.stats
        if stats.stop_reason == "interrupted" and not answer:
            self.messages.pop()  # nothing to keep: as if the question was never asked
        else:
            self.messages.append({"role": "assistant", "content": answer})
        self.stats_line = stats.line() + (f" | {stats.stop_reason}" if stats.stop_reason not in ("eos", "") else "")
        self.err.print(self.stats_line, style="dim", soft_wrap=True)
        if self.args.stats_json:
            record = {**asdict(stats), "prefill_tps": stats.prefill_tps, "decode_tps": stats.decode_tps,
                      "acceptance_rate": stats.acceptance_rate, "tokens_per_step": stats.tokens_per_step,
                      "draft_share": stats.draft_share}
            with open(self.args.stats_json, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
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

    def interactive(self, document: str | None, session) -> None:
        out = sys.stdout
        say = lambda text: self.err.print(text, soft_wrap=True, markup=False, style="dim")
        if document is not None:
            say(f"(document loaded: {len(document)} characters; it goes with your first message)")
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
            user_text = document + "\n\n" + text if document is not None else text
            try:
                reason = self.turn(user_text, out, markdown=out.isatty())
            except InferError as e:
                self.err.print(f"{e}\nThe conversation is too long for the context: /reset to start over "
                               f"(or restart with a larger --max-context).", soft_wrap=True, markup=False)
                continue
            document = None
            if reason == "context full":
                say("(the context is full: /reset to start over)")


def make_session(tty=None):
    """A prompt-toolkit session: Enter sends, Esc+Enter / Alt+Enter inserts a newline; history in the data dir."""
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

        extra = dict(input=create_input(stdin=tty), output=create_output(stdout=tty))
    return PromptSession(history=history, key_bindings=bindings, multiline=False, **extra)


def open_tty():
    try:
        return open("/dev/tty", "r+", encoding="utf-8")
    except OSError:
        return None


def cmd_chat(args) -> None:
    from infer.cli.main import load_engine, read_stdin

    documents = [read_document_file(f) for f in args.file or []]
    if not args.file and not sys.stdin.isatty():
        text = read_stdin()
        if not text.strip():
            raise InferError("stdin is empty: pipe a document in (cat doc.txt | infer chat MODEL), or run in a terminal")
        documents.append(text)
    document = "\n\n".join(documents) if documents else None
    if args.file and not (document or "").strip():
        raise InferError("the --file documents are empty")

    tty = None
    interactive = args.prompt is None and sys.stdin.isatty()
    if args.prompt is None and not sys.stdin.isatty():
        tty = open_tty()
        interactive = tty is not None
    engine = load_engine(args)
    chat = Chat(engine, args, args.system)
    if interactive:
        chat.interactive(document, make_session(tty))
        return
    question = args.prompt if args.prompt is not None else DEFAULT_REQUEST
    chat.turn(document + "\n\n" + question if document is not None else question, sys.stdout)
