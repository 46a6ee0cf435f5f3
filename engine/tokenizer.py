"""Tokenizer of a Hugging Face model folder: tokenizer.json (tokenizers) or tokenizer.model (sentencepiece),
its chat template rendered as transformers renders it, and incremental detokenization for streaming."""

import bisect
import functools
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import sentencepiece
import tokenizers
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import read_json_object
from .errors import InferError

# The named special tokens transformers passes to chat templates (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(token, source: str, name: str) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict with "content", or null."""
    content = token.get("content") if isinstance(token, dict) else token
    if content is not None and not isinstance(content, str):
        raise InferError(f"{source}: {name} must be a token string or an object with its \"content\", got {token!r}")
    return content


def _chat_template(config: dict, source: str) -> str | None:
    """The chat template of tokenizer_config.json: a string, or a list of named ones ("default" is used)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: transformers uses "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise InferError(f"{source}: chat_template must be a string or a list of named templates")
    return template


class Tokenizer:
    """Text <-> token ids for one model folder; build with `Tokenizer.from_dir`."""

    def __init__(self, chat_template: str | None, special_tokens: dict[str, str]):
        self.chat_template = chat_template
        self.special_tokens = special_tokens  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}
        self.bos_token_id = self.token_to_id(special_tokens["bos_token"]) if "bos_token" in special_tokens else None
        self.eos_token_id = self.token_to_id(special_tokens["eos_token"]) if "eos_token" in special_tokens else None

    @staticmethod
    def from_dir(path) -> "Tokenizer":
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = read_json_object(config_file) if config_file.is_file() else {}
        template = _chat_template(config, str(config_file))
        if (path / "chat_template.jinja").is_file():  # the separate file wins over tokenizer_config.json
            try:
                template = (path / "chat_template.jinja").read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InferError(f"cannot read {path / 'chat_template.jinja'}: {e}") from None
        contents = {name: _content(config.get(name), str(config_file), name) for name in SPECIAL_TOKEN_NAMES}
        special = {name: content for name, content in contents.items() if content}
        if (path / "tokenizer.json").is_file():
            try:
                tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises plain Exception on a bad file
                raise InferError(f"corrupt tokenizer file {path / 'tokenizer.json'}: {e}") from e
            return _TokenizersTokenizer(tok, template, special)
        if (path / "tokenizer.model").is_file():
            return _SentencePieceTokenizer(path / "tokenizer.model", config, template, special)
        raise InferError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model")

    @staticmethod
    def from_gguf(tokenizer: tokenizers.Tokenizer, config: dict) -> "Tokenizer":
        """The tokenizer of a GGUF model (engine/gguf.py builds both from the file's metadata)."""
        special = {name: config[name] for name in SPECIAL_TOKEN_NAMES if config.get(name)}
        return _TokenizersTokenizer(tokenizer, config.get("chat_template"), special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str | None:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The model's chat template rendered over `messages`, as transformers' apply_chat_template(tokenize=False)."""
        if self.chat_template is None:
            raise InferError("this model has no chat template (tokenizer_config.json or chat_template.jinja)")
        variables = {
            "messages": [{k: v for k, v in m.items() if v is not None} for m in messages],
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
            **self.special_tokens,
            **extra,
        }
        try:
            return _compile(self.chat_template).render(**variables)
        except jinja2.TemplateError as e:
            raise InferError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; the template writes any bos itself, so none is added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


class _TokenizersTokenizer(Tokenizer):
    """tokenizer.json through the `tokenizers` library, which does everything: added tokens, bos/eos, decoding."""

    def __init__(self, tok: tokenizers.Tokenizer, chat_template: str | None, special: dict[str, str]):
        self._tok = tok
        self._prefix = PrefixEncoder(tok)
        # As transformers: the special tokens named in tokenizer_config.json always encode as one id.
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        self._tok.add_special_tokens(
            [tokenizers.AddedToken(t, special=True, normalized=False) for t in special.values() if t not in added]
        )
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        super().__init__(chat_template, special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self._prefix.encode(self.apply_chat_template(messages, add_generation_prompt))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class PrefixEncoder:
    """Encodes a chat that mostly repeats the last one (the next turn of a conversation, or a server request that
    resends a long document with a new question) by re-encoding only from shortly before where the texts part.

    Encoding a long document again would delay every first token (BENCHMARKS.md). Byte-level BPE is local: a
    pre-token depends on the few characters around it, so the last encoding's tokens up to the cut still hold. The
    cut is a token that starts a line with a non-space character, at least MARGIN characters before the texts part;
    the new text is encoded from there, and the result is kept only when that encoding reproduces the last one's
    tokens over OVERLAP characters past the cut (same ids at the same offsets). Anything else (a tokenizer that
    treats a text's start specially, as sentencepiece's leading space) fails that check and is encoded whole."""

    MIN_CHARS = 8192  # shorter texts are encoded whole
    MARGIN = 256  # characters between the cut and where the texts part
    OVERLAP = 64  # characters past the cut over which both encodings must agree
    SEARCH = 4096  # tokens searched back for a cut

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self.last: tuple[str, list[int], list[int]] | None = None  # (text, ids, each token's start offset)

    def encode(self, text: str) -> list[int]:
        ids_starts = self._reuse(text) if self.last is not None and len(text) >= self.MIN_CHARS else None
        if ids_starts is None:
            encoding = self.tok.encode(text, add_special_tokens=False)
            ids_starts = encoding.ids, [start for start, _ in encoding.offsets]
        self.last = (text, *ids_starts)
        return list(ids_starts[0])

    def _reuse(self, text: str) -> tuple[list[int], list[int]] | None:
        old, ids, starts = self.last
        shared = _common_prefix(old, text)
        i = bisect.bisect_right(starts, shared - self.MARGIN) - 1
        for i in range(i, max(0, i - self.SEARCH), -1):  # a token at the start of a line, not a space
            cut = starts[i]
            if old[cut - 1] == "\n" and not old[cut].isspace() and starts[i - 1] < cut:
                break
        else:
            return None
        tail = self.tok.encode(text[cut:], add_special_tokens=False)
        check = bisect.bisect_left(starts, cut + self.OVERLAP, lo=i) - i  # the old tokens that start in the overlap
        tail_starts = [cut + start for start, _ in tail.offsets]
        if check < 1 or tail.ids[:check] != ids[i:i + check] or tail_starts[:check] != starts[i:i + check]:
            return None
        return ids[:i] + tail.ids, starts[:i] + tail_starts


def _common_prefix(a: str, b: str) -> int:
    """The length of the common prefix of a and b (binary search over slice comparisons, which run at C speed)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid - 1
    return low


class _SentencePieceTokenizer(Tokenizer):
    """tokenizer.model through `sentencepiece`, as Llama-2's (slow, legacy) LlamaTokenizer: bos first, added tokens
    cut out of the text, and every piece of text between them encoded by sentencepiece with its dummy-prefix space."""

    def __init__(self, file: Path, config: dict, chat_template: str | None, special: dict[str, str]):
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.load(str(file))
        except (OSError, RuntimeError) as e:
            raise InferError(f"corrupt tokenizer file {file}: {e}") from e
        sp = self._sp
        for name, sp_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
            if name not in special and sp_id >= 0:
                special[name] = sp.id_to_piece(sp_id)
        # Added tokens by content, as AddedToken dicts plus their "id"; the named special tokens are added tokens too.
        added = {t["content"]: {**t, "id": int(i)} for i, t in _added_tokens(config, file.parent).items()}
        for token in special.values():
            if token not in added and self._piece_id(token) is not None:
                added[token] = {"content": token, "id": self._piece_id(token), "special": True}
        self._added = {t["id"]: t for t in added.values()}
        self._added_ids = {content: t["id"] for content, t in added.items()}
        longest_first = sorted(added.values(), key=lambda t: -len(t["content"]))
        self._split = re.compile("|".join(map(_added_token_pattern, longest_first))) if added else None
        self._split_ids = [t["id"] for t in longest_first]  # by regex group
        self._add_bos, self._add_eos = (_flag(config, key, default, file.parent) for key, default in
                                        (("add_bos_token", True), ("add_eos_token", False)))
        self.vocab_size = max(sp.get_piece_size(), max(self._added, default=-1) + 1)
        super().__init__(chat_template, special)

    def _piece_id(self, piece: str) -> int | None:
        sp_id = self._sp.piece_to_id(piece)  # unknown pieces map to unk
        return sp_id if sp_id != self._sp.unk_id() or piece == self._sp.id_to_piece(sp_id) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens and self._add_bos and self.bos_token_id is not None else []
        start = 0
        for m in self._split.finditer(text) if self._split else ():  # an added token, with what it strips
            ids += self._sp.encode(text[start : m.start()])
            ids.append(self._split_ids[m.lastindex - 1])
            start = m.end()
        ids += self._sp.encode(text[start:])
        if add_special_tokens and self._add_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Each run of pieces between added tokens decoded by sentencepiece (dropping its dummy-prefix space), so
        decode(encode(text, add_special_tokens=False)) == text. Ids outside the vocabulary are ignored."""
        parts, run = [], []
        for i in ids:
            added = self._added.get(i)
            if added is None:
                if 0 <= i < self._sp.get_piece_size():
                    run.append(i)
            elif not (skip_special_tokens and added.get("special")):
                parts += [self._sp.decode(run), added["content"]]
                run = []
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        return self._added_ids[token] if token in self._added_ids else self._piece_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added:
            return self._added[token_id]["content"]
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._sp.get_piece_size() else None


def _added_tokens(config: dict, folder: Path) -> dict:
    """tokenizer_config.json's added_tokens_decoder: {"<id>": {"content": str, ...}}, checked."""
    tokens = config.get("added_tokens_decoder") or {}
    valid = isinstance(tokens, dict) and all(
        i.isdigit() and isinstance(t, dict) and isinstance(t.get("content"), str) and t["content"]
        for i, t in tokens.items())
    if not valid:
        raise InferError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder must map token ids to objects "
                         f"with a non-empty \"content\"")
    return tokens


def _flag(config: dict, key: str, default: bool, folder: Path) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise InferError(f"{folder / 'tokenizer_config.json'}: {key} must be true or false, got {value!r}")
    return value


def _added_token_pattern(token: dict) -> str:
    """A regex group matching the token, plus the whitespace it swallows on its left/right (lstrip/rstrip)."""
    left, right = ("\\s*" if token.get(side) else "" for side in ("lstrip", "rstrip"))
    return f"{left}({re.escape(token['content'])}){right}"


class StreamDecoder:
    """Incremental detokenization: push() returns the text that the new token makes final, holding back an
    incomplete UTF-8 character; all pushes joined, plus flush(), equal tokenizer.decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # window start: decoding from a token boundary keeps leading-space handling consistent
        self._done = 0  # ids[:done] are emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """The held-back rest (an incomplete character decodes to U+FFFD here)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._tokenizer.decode(self._ids[self._start : self._done], self._skip)
        text = self._tokenizer.decode(self._ids[self._start :], self._skip)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return text[len(before) :]


class _GenerationTag(Extension):
    """transformers' {% generation %}...{% endgeneration %} marks assistant text for training masks; render the body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """Unlike Jinja's own tojson: no HTML escaping, non-ASCII kept, json.dumps' options exposed."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise_exception
_ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)
