"""Quality of block-sparse attention against dense attention on one model: passkey retrieval and log-likelihood.

Passkey (Mohtashami & Jaggi, 2023): a needle "The pass key is 71432. Remember it. 71432 is the pass key." sits at
a depth fraction of a filler document, the question follows, all inside the model's chat template; a greedy answer
of a few tokens (plain decoding, no speculative drafts) is correct when it contains the key. The filler is generated
from templates and word lists by a seeded random stream (no data files, no digits), and the prompt is sized in
tokens with the model's tokenizer.

Log-likelihood: teacher-forced negative log-likelihood of each token of a long English text, prefilled in chunks
through one KV cache, so that every later chunk attends (densely or sparsely) to all earlier ones. The text is the
concatenation of the license texts in /usr/share/common-licenses (the GPL, LGPL, GFDL, MPL, Apache and other
licenses that Debian and Ubuntu install with base-files), in the fixed order of LICENSES; near-duplicate versions
(LGPL-2 beside LGPL-2.1, GFDL-1.2 beside GFDL-1.3) are left out. Without that folder, Python's own reference
documentation (pydoc_data.topics, prose that varies with the Python version) stands in. A user's file can replace
both. The result names the source and a hash of the text, so numbers from two machines can be compared.
Sparse prefill shares one block selection per tile of block_size queries, chosen with all of them, so the selection
behind a prediction may depend on up to block_size - 1 later tokens, the predicted one among them: the mean over
the last query of each tile (the strictly causal predictions) is reported beside the mean over all.

Each attention mode runs on its own Engine: dense with sparse mode "off", sparse with the settings under test
(`infer eval` makes the dense one a variant of the sparse one: the same model, a KV cache of its own).
"""

import hashlib
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attention import SelectionRecord, latest_read, selection_tile, uses_sparse
from ..errors import InferError
from ..generate import Engine
from ..memory import check_context
from ..tokenizer import Tokenizer
from ..weights import Checkpoint

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_TOKENS = 12  # greedy tokens generated per answer
MIN_FILLER_TOKENS = 32  # a document needs at least this much room around the needle

LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSES = ("GPL-3", "GPL-2", "LGPL-2.1", "GFDL-1.3", "MPL-2.0", "MPL-1.1", "Apache-2.0", "CC0-1.0", "Artistic",
            "LGPL-3", "GPL-1", "BSD")
NLL_CHUNK = 1024  # tokens per forward pass of the log-likelihood prefill: bounds the [chunk, vocab] logits

_SUBJECTS = ("the old farmer", "a young teacher", "the baker", "my neighbour", "the tired traveller", "a quiet child",
             "the captain", "the gardener", "an old friend", "the painter", "the night guard", "a curious student",
             "the fisherman", "the doctor", "the librarian", "a small dog", "the shepherd", "the carpenter")
_VERBS = ("walked", "rested", "waited", "sang", "read a book", "looked around", "drank some tea", "fell asleep",
          "wrote a letter", "laughed", "counted the clouds", "cooked dinner", "listened to the rain", "sat down")
_PLACES = ("river", "old bridge", "market", "hill", "harbour", "library", "garden", "forest", "village square",
           "train station", "bakery", "lighthouse", "meadow", "castle", "orchard", "valley")
_ADJECTIVES = ("green", "quiet", "bright", "cold", "warm", "ancient", "narrow", "busy", "peaceful", "dusty", "golden",
               "gentle", "crowded", "empty", "calm", "windy")
_NOUNS = ("grass", "sky", "road", "wind", "sea", "lamp", "door", "bell", "cart", "roof", "fence", "path", "cloud",
          "stone", "window", "boat")
_PLURALS = ("birds", "flowers", "children", "apples", "leaves", "lanterns", "sheep", "boats", "songs", "stories")
_TIMES = ("morning", "evening", "afternoon", "night", "spring", "summer", "autumn", "winter")
_ADVERBS = ("slowly", "quietly", "happily", "carefully", "again", "alone", "for a while", "without a word")
_TEMPLATES = (
    "The {noun} is {adj}.",
    "In the {time}, {subject} {verb} near the {place}.",
    "{Subject} {verb} {adverb} by the {place}.",
    "The {place} was {adj} and full of {plural}.",
    "Nobody knew why the {noun} near the {place} was so {adj}.",
    "Every {time} the {plural} come back to the {adj} {place}.",
    "{Subject} said that the {noun} would stay {adj} until the {time}.",
    "There and back again, {subject} {verb} {adverb}.",
    "The {adj} {noun} of the {place} is known to everyone.",
    "When the {noun} turned {adj}, {subject} {verb}.",
)


def filler_sentences(seed: int):
    """An endless, deterministic stream of plain English sentences without digits."""
    rng = random.Random(f"filler:{seed}")
    while True:
        subject = rng.choice(_SUBJECTS)
        words = dict(subject=subject, Subject=subject[0].upper() + subject[1:], verb=rng.choice(_VERBS),
                     place=rng.choice(_PLACES), adj=rng.choice(_ADJECTIVES), noun=rng.choice(_NOUNS),
                     plural=rng.choice(_PLURALS), time=rng.choice(_TIMES), adverb=rng.choice(_ADVERBS))
        yield rng.choice(_TEMPLATES).format(**words)


@dataclass
class PasskeyCase:
    length: int  # tokens asked for; len(tokens) is at most this
    depth: float  # fraction of the filler before the needle
    key: str
    tokens: list[int]  # the whole chat prompt
    needle_at: int  # token position where the needle starts


def passkey_case(tokenizer: Tokenizer, length: int, depth: float, seed: int = 0) -> PasskeyCase:
    """The chat prompt of at most `length` tokens hiding a 5-digit key at `depth` of its filler (deterministic)."""
    key = str(random.Random(f"key:{seed}:{length}:{depth}").randint(10000, 99999))
    needle = NEEDLE.format(key=key)

    def render(before: list[str], after: list[str]) -> str:
        document = " ".join(before + [needle] + after)
        content = f"{INTRO}\n\n{document}\n\n{QUESTION}"
        return tokenizer.apply_chat_template([{"role": "user", "content": content}])

    budget = length - len(tokenizer.encode(render([], []), add_special_tokens=False))
    if budget < MIN_FILLER_TOKENS:
        raise InferError(f"a passkey prompt of {length} tokens leaves no room for a document; ask for more tokens")
    sentences, sizes, total = [], [], 0
    for sentence in filler_sentences(seed):
        size = len(tokenizer.encode(" " + sentence, add_special_tokens=False))
        if total + size > budget:
            break
        sentences.append(sentence)
        sizes.append(size)
        total += size
    split, before = 0, 0
    while split < len(sentences) and before + sizes[split] <= depth * total:
        before += sizes[split]
        split += 1
    while True:  # sentence boundaries may merge or split tokens: drop filler until the prompt fits
        text = render(sentences[:split], sentences[split:])
        tokens = tokenizer.encode(text, add_special_tokens=False)
        if len(tokens) <= length or not sentences:
            break
        sentences.pop()
        split = min(split, len(sentences))
    needle_at = len(tokenizer.encode(text[:text.index(needle)], add_special_tokens=False))
    return PasskeyCase(length, depth, key, tokens, needle_at)


@dataclass
class PasskeyRow:
    length: int  # tokens asked for
    tokens: int  # prompt tokens
    depth: float
    needle_at: int
    key: str
    dense: str  # the dense engine's answer
    sparse: str  # the sparse engine's answer
    sparse_attention: str  # the path the sparse engine's last answer token took: "sparse" or "dense"
    kv_read: float  # share of the cached keys that token read (last layer, mean over kv heads)
    dense_correct: bool = field(init=False)
    sparse_correct: bool = field(init=False)
    equal: bool = field(init=False)  # the two answers are the same text

    def __post_init__(self):
        self.dense_correct, self.sparse_correct = self.key in self.dense, self.key in self.sparse
        self.equal = self.dense == self.sparse


def answer(engine: Engine, tokens: list[int], max_tokens: int = ANSWER_TOKENS) -> tuple[str, str, float]:
    """(greedy answer, whitespace-stripped; attention path of its last step; share of the KV cache that step read).

    Plain decoding, one token per forward pass: no speculative drafts are verified in shared passes, so each
    answer token gets its own sparse selection, as the attention under test defines it.
    """
    logits = engine.prefill(tokens)  # [V]
    out = []
    try:
        while len(out) < max_tokens:
            token = int(logits.argmax())
            if token in engine.eos_ids:
                break
            out.append(token)
            if len(out) == max_tokens or len(tokens) + len(out) >= engine.max_len:
                break
            logits = engine.decode(torch.tensor([token], device=engine.device))[-1]
        path, read = latest_read(engine.cache, engine.cache.length, engine.decode.record)
    finally:
        engine.cache.truncate(len(engine.tokens))  # the engine holds the prompt again: prefix reuse stays valid
    return engine.tokenizer.decode(out, skip_special_tokens=True).strip(), path, read


def run_passkey(dense: Engine, sparse: Engine, lengths: list[int], depths: list[float], seed: int = 0,
                answer_tokens: int = ANSWER_TOKENS, on_row: Callable[[PasskeyRow], None] | None = None) -> list[PasskeyRow]:
    """One row per (length, depth): both engines answer the same prompt greedily."""
    rows = []
    for length in lengths:
        for depth in depths:
            case = passkey_case(dense.tokenizer, length, depth, seed)
            dense_answer, _, _ = answer(dense, case.tokens, answer_tokens)
            sparse_answer, path, read = answer(sparse, case.tokens, answer_tokens)
            row = PasskeyRow(length, len(case.tokens), depth, case.needle_at, case.key, dense_answer, sparse_answer,
                             path, read)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def natural_text(path: str | Path | None = None) -> tuple[str, str]:
    """(text, where it comes from): the file at `path`, else the license texts, else Python's reference docs."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InferError(f"cannot read the text file {path}: {e}") from None
        source = str(path)
    else:
        found = [LICENSE_DIR / name for name in LICENSES if (LICENSE_DIR / name).is_file()]
        if found:
            text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in found)
            source = f"{LICENSE_DIR}/{{{','.join(f.name for f in found)}}}"
        else:
            from pydoc_data.topics import topics

            text = "\n\n".join(topics[name].strip() for name in sorted(topics))
            source = f"Python {sys.version_info.major}.{sys.version_info.minor} pydoc_data.topics"
    return text, f"{source} (sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]})"


@dataclass
class NllResult:
    source: str  # the text and its hash
    tokens: int  # tokens scored: tokens - 1 predictions
    boundary: int  # "long" predictions are those made at positions >= boundary (the sparse side's dense_len)
    dense_all: float  # mean NLL per token (nats), dense
    sparse_all: float
    dense_long: float  # the same over the long predictions (nan when there are none)
    sparse_long: float
    top1_agree_long: float  # share of long predictions where both modes rank the same token first
    causal_long: int  # long predictions whose block selection saw no later token (the last query of each tile)
    dense_causal: float  # mean NLL over those
    sparse_causal: float
    sparse_predictions: int  # predictions the sparse engine made through sparse attention
    kv_read_long: float  # share of the causal keys read by sparse query tiles past the boundary (last layer)

    @property
    def long_predictions(self) -> int:
        return max(0, self.tokens - 1 - self.boundary)

    @property
    def diff_all(self) -> float:
        return self.sparse_all - self.dense_all

    @property
    def diff_long(self) -> float:
        return self.sparse_long - self.dense_long

    @property
    def diff_causal(self) -> float:
        return self.sparse_causal - self.dense_causal


@dataclass
class TokenScores:
    """Teacher-forced scores of tokens[1:]: entry i is the prediction made at position i. All on the CPU."""

    nll: torch.Tensor  # [N-1] fp32, -log p(tokens[i+1] | tokens[:i+1])
    top1: torch.Tensor  # [N-1] the most likely next token
    sparse: torch.Tensor  # [N-1] bool: position i attended sparsely
    causal: torch.Tensor  # [N-1] bool: i's block selection (shared by a query tile) saw no token after i
    reads: list[tuple[int, float]]  # per sparse query tile of the last layer: (its last position, share of keys read)


def token_nll(engine: Engine, tokens: list[int], chunk: int = NLL_CHUNK, split: int | None = None) -> TokenScores:
    """Score tokens prefilled in chunks through the engine's cache; a chunk boundary falls at `split`.

    With `split` = dense_len, auto mode keeps the positions below it dense, as generation would. Sparse prefill
    selects blocks per tile of queries, so the selection of a query also depends on the later queries of its tile
    (up to block_size - 1 tokens ahead): the last query of each tile is the strictly causal one.
    """
    n = len(tokens)
    if n > engine.max_len:
        raise InferError(f"{n} tokens do not fit the {engine.max_len}-token context; ask for fewer or raise --max-context")
    ids = torch.tensor(tokens, dtype=torch.long, device=engine.device)
    bounds = sorted({*range(0, n, chunk), *([split] if split and 0 < split < n else []), n})
    nll, top1, sparse, causal, reads = [], [], [], [], []
    engine.reset()
    try:
        for begin, end in zip(bounds, bounds[1:]):
            record = SelectionRecord()
            logits = engine.model.run(ids[begin:end], engine.cache, end - begin, record)  # [T, V] fp32
            targets = ids[begin + 1:end + 1]  # the last position of the text predicts nothing
            m = targets.shape[0]
            logp = logits[:m].log_softmax(-1)
            nll.append(-logp.gather(1, targets[:, None])[:, 0].cpu())
            top1.append(logp.argmax(-1).cpu())
            path = uses_sparse(engine.cache, end)
            sparse.append(torch.full((m,), path))
            q_tile = selection_tile(end - begin, engine.sparse.block_size) if path else 1
            local = torch.arange(m)
            causal.append((local % q_tile == q_tile - 1) | (local == end - begin - 1))
            if path and record.block_count is not None:
                reads += _tile_reads(record.block_count, begin, end, engine.sparse.block_size)
    finally:
        engine.reset()
    return TokenScores(torch.cat(nll), torch.cat(top1), torch.cat(sparse), torch.cat(causal), reads)


def _tile_reads(block_count: torch.Tensor, begin: int, end: int, block_size: int) -> list[tuple[int, float]]:
    """(last position, share of its causal keys read) per query tile of one sparse call; block_count [Hkv, n_tiles]."""
    num_q, q_tile = end - begin, selection_tile(end - begin, block_size)
    out = []
    for i, count in enumerate(block_count.float().mean(0).tolist()):
        last = begin + min((i + 1) * q_tile, num_q) - 1
        out.append((last, min(1.0, count * block_size / (last + 1))))
    return out


def run_nll(dense: Engine, sparse: Engine, num_tokens: int, text_path: str | Path | None = None,
            chunk: int = NLL_CHUNK) -> NllResult:
    """Mean per-token NLL of the first num_tokens tokens of the natural text, dense vs sparse."""
    text, source = natural_text(text_path)
    tokens = dense.tokenizer.encode(text, add_special_tokens=False)
    if len(tokens) < num_tokens:
        raise InferError(f"the text ({source}) has only {len(tokens)} tokens; ask for fewer log-likelihood tokens")
    tokens = tokens[:num_tokens]
    boundary = sparse.sparse.dense_len if sparse.sparse is not None else num_tokens
    d = token_nll(dense, tokens, chunk, boundary)
    s = token_nll(sparse, tokens, chunk, boundary)
    long = torch.arange(num_tokens - 1) >= boundary  # predictions made at positions >= boundary
    causal = long & s.causal
    long_reads = [share for last, share in s.reads if last >= boundary]
    mean = lambda x: x.double().mean().item() if x.numel() else float("nan")
    return NllResult(
        source=source, tokens=num_tokens, boundary=boundary,
        dense_all=mean(d.nll), sparse_all=mean(s.nll), dense_long=mean(d.nll[long]), sparse_long=mean(s.nll[long]),
        top1_agree_long=mean((d.top1 == s.top1)[long].float()),
        causal_long=int(causal.sum()), dense_causal=mean(d.nll[causal]), sparse_causal=mean(s.nll[causal]),
        sparse_predictions=int(s.sparse.sum()),
        kv_read_long=sum(long_reads) / len(long_reads) if long_reads else float("nan"),
    )


def model_context(model_dir: Path, max_context: int | None) -> int:
    """The tokens an Engine's cache will hold: --max-context (checked as the Engine checks it) or the model's own
    context."""
    cfg = Checkpoint(model_dir).config()
    if max_context is None:
        return cfg.max_position_embeddings
    check_context(max_context, cfg.max_position_embeddings)
    return max_context


def check_request(model_dir: Path, max_context: int | None, lengths: list[int], depths: list[float],
                  answer_tokens: int, nll_tokens: int) -> int:
    """Validate the sizes against the model's context and tokenizer before the weights load; returns the context."""
    context = model_context(model_dir, max_context)
    if not lengths and not nll_tokens:
        raise InferError("nothing to evaluate: give passkey --lengths or --nll-tokens")
    if lengths and not depths:
        raise InferError("give at least one needle depth (--depths)")
    if not all(0 <= d <= 1 for d in depths):  # (nan too)
        raise InferError(f"needle depths are fractions of the document, from 0 to 1; got {','.join(map(str, depths))}")
    if not 1 <= answer_tokens < context:
        raise InferError(f"--answer-tokens must be at least 1 and leave room for a prompt in the {context}-token "
                         f"context, got {answer_tokens}")
    for length in lengths:
        if length < 1 or length + answer_tokens > context:
            raise InferError(f"a passkey prompt of {length} tokens plus {answer_tokens} answer tokens does not fit "
                             f"the {context}-token context (1 to {context - answer_tokens})")
    if nll_tokens and not 2 <= nll_tokens <= context:
        raise InferError(f"--nll-tokens {nll_tokens}: from 2 to the {context}-token context, or 0 to skip")
    if lengths:
        passkey_case(Checkpoint(model_dir).tokenizer(), min(lengths), 0.5)  # raises if the prompt leaves no room
    return context
