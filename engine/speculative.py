"""Speculative decoding: cheap drafters propose tokens, the target checks them all in one forward pass.

Drafters, chosen per step: n-gram prompt lookup (what followed the latest earlier occurrence of the context's last
n-gram: free, and strong when the answer copies from the document) and otherwise a draft model (a smaller model with
the target's tokenizer, optionally with FR-Spec's pruned LM head). The target scores the drafted positions plus one
through its own KV cache and attention path, in a pass of one of a few fixed WIDTHS (the draft padded: each width's
CUDA graph is captured once and replayed); `verify` keeps the prefix it agrees with and the cache is truncated
past it (key summaries are a pure function of the keys, so truncation is the whole rollback).

Speculation is adaptive: a drafter drafts only as many tokens as pay for the wider pass (`plan`: the expected
accepted length under its recent acceptance against PassCost, the relative cost of each width). While no drafter
has a draft that pays, the engine runs plain steps; a drafter whose drafts stopped paying backs off and probes
again later.

A verification pass gives the logits one-token steps would give, up to float rounding: under sparse attention each
of its k+1 queries selects its own blocks, as it would decoded alone (attention.attend), so greedy output equals
plain greedy output with sparse attention on and off.
"""

import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import DECODE_MAX_QUERIES, uses_sparse
from .config import ModelConfig
from .cuda_graph import GraphedDecode
from .device import synchronize
from .errors import InferError, ParameterError
from .sampling import Sampler, apply_repetition_penalty, probabilities
from .tokenizer import Tokenizer
from .model import prefill, reusable_prefix
from .weights import Checkpoint, load_model

MAX_DRAFT = DECODE_MAX_QUERIES - 1  # drafted tokens per step: the k + 1 queries verified fit the decode path
LOOKUP_MIN_PROMPT = 1024  # lookup=None turns n-gram lookup on for prompts at least this long
NGRAM_SIZES = (4, 3, 2)  # lookup tries the longest n-gram first
WIDTHS = tuple(w for w in (1, 2, 4, 8, 16) if w < DECODE_MAX_QUERIES) + (DECODE_MAX_QUERIES,)  # tokens a pass verifies
PASS_TOKEN_COST = 0.1  # PassCost's model: each token of a pass beyond the first adds this share of a one-token step
PRIOR_RATE = 0.7  # a drafter's acceptance rate before any of its drafts is verified
RATE_DECAY = 0.6  # the weight of the estimate before each verified draft token
MAX_BACKOFF = 64  # the most plain steps between two probes of a failing drafter


@dataclass
class SpeculativeConfig:
    draft: Path | None = None  # a draft model folder
    lookup: bool | None = None  # n-gram prompt lookup; None: on for prompts of LOOKUP_MIN_PROMPT tokens or more
    fr_spec: int | None = None  # keep this many token ids in the draft model's LM head (FR-Spec); None: all
    max_draft: int = MAX_DRAFT  # most tokens drafted per step (k)

    def __post_init__(self):
        if self.fr_spec is not None and self.draft is None:
            raise ParameterError("fr_spec", "prunes the draft model's LM head: give a draft model ({draft}) too", ("draft",))
        if not 1 <= self.max_draft <= MAX_DRAFT:
            raise ParameterError("max_draft", f"must be between 1 and {MAX_DRAFT}, got {self.max_draft}")
        if self.fr_spec is not None and self.fr_spec < 1:
            raise ParameterError("fr_spec", f"must be at least 1, got {self.fr_spec}")

    @property
    def enabled(self) -> bool:
        return self.draft is not None or self.lookup is not False


@dataclass
class PassCost:
    """The time of a pass verifying w tokens, for each w of WIDTHS, relative to a one-token step, and of one token
    drafted by the draft model: the costs every speculation decision reads. `model` is the fixed model (a decode
    step reads the weights once; more tokens add little); `measure` times the passes on the device."""

    width: dict[int, float]
    draft_token: float = 0.0

    @classmethod
    def model(cls, draft_token: float = 0.0) -> "PassCost":
        return cls({w: 1 + PASS_TOKEN_COST * (w - 1) for w in WIDTHS}, draft_token)

    @classmethod
    def measure(cls, decode: GraphedDecode, draft: GraphedDecode | None = None, repeats: int = 5) -> "PassCost":
        """Time passes of each width at the cache's length (and a draft model's one-token step at its own), rolled
        back after: on CUDA these are replays of the graphs decoding will use, captured here if new."""
        def seconds(d: GraphedDecode, w: int) -> float:
            start, tokens = d.cache.length, torch.zeros(w, dtype=torch.long, device=d.cache.k.device)
            d(tokens)  # warm-up: the capture of a new graph
            d.cache.truncate(start)
            synchronize(tokens.device)
            began = time.perf_counter()
            for _ in range(repeats):
                d(tokens)
                d.cache.truncate(start)
            synchronize(tokens.device)
            return (time.perf_counter() - began) / repeats

        passes = {w: seconds(decode, w) for w in WIDTHS}
        return cls({w: t / passes[1] for w, t in passes.items()},
                   0.0 if draft is None else seconds(draft, 1) / passes[1])


def pass_width(tokens: int) -> int:
    """The width of the pass that verifies `tokens` tokens (the fed one and its drafts): the next of WIDTHS."""
    return next(w for w in WIDTHS if w >= tokens)


@dataclass
class Acceptance:
    """One drafter's record: its estimated acceptance rate (the chance that a draft token is accepted when those
    before it were, an exponential average) and its backoff after failures (drafting nothing or too little to pay,
    a probe rejected)."""

    rate: float = PRIOR_RATE
    wait: int = 0  # plain steps before the drafter may draft again
    backoff: int = 1  # the wait after its next failure
    probing: bool = False  # its next draft is a probe: one token, whatever the rate says

    def verified(self, drafted: int, accepted: int) -> None:
        for _ in range(accepted):
            self.rate = RATE_DECAY * self.rate + (1 - RATE_DECAY)
        if accepted < drafted:
            self.rate *= RATE_DECAY
        if accepted:
            self.backoff, self.probing = 1, False
        elif self.probing:
            self.fail()

    def fail(self) -> None:
        self.wait, self.backoff, self.probing = self.backoff, min(2 * self.backoff, MAX_BACKOFF), True


def plan(rate: float, available: int, cost: PassCost, draft_cost: float) -> int:
    """How many of `available` draft tokens to verify (0: a plain step pays best): the count whose pass gives the
    most expected tokens (1 + rate + ... + rate^j: the accepted drafts and the target's own token) per unit of
    time (the pass's width cost, plus draft_cost per drafted token)."""
    best, best_gain = 0, 1.0 / cost.width[1]
    for w in WIDTHS[1:]:
        j = min(w - 1, available)
        gain = sum(rate ** i for i in range(j + 1)) / (cost.width[w] + j * draft_cost)
        if gain > best_gain:
            best, best_gain = j, gain
    return best


class NgramLookup:
    """Prompt lookup decoding: propose the tokens that followed the latest earlier occurrence of the last n-gram.

    The index outlives a turn: the next turn's prompt (the conversation so far, or a server request resending the same
    document) shares a prefix with what was indexed, and `rewind` undoes only the positions past that prefix, exactly,
    instead of indexing the whole prompt again before the first token."""

    def __init__(self, sizes: tuple[int, ...] = NGRAM_SIZES):
        self.sizes = sizes
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> the position right after its latest occurrence
        self.seen: list[int] = []  # the tokens indexed: index holds the n-grams ending before each of their positions
        self.replaced = {n: array("q") for n in sizes}  # [position]: the n-gram's entry before it, -1 for none

    @property
    def indexed(self) -> int:
        return len(self.seen)

    def extend(self, context: list[int], upto: int) -> None:
        """Index the n-grams of context[:upto] (the prompt's, chunk by chunk while it prefills); context[:indexed]
        must be the tokens indexed so far (begin a turn with `rewind`)."""
        for p in range(self.indexed, upto):
            for n in self.sizes:
                if p < n:  # no n-gram ends here yet
                    self.replaced[n].append(-1)
                    continue
                key = tuple(context[p - n:p])
                self.replaced[n].append(self.index.get(key, -1))
                self.index[key] = p
        self.seen.extend(context[self.indexed:upto])

    def rewind(self, tokens: list[int]) -> None:
        """Keep the index of the longest common prefix of the tokens indexed and `tokens`; undo the rest."""
        keep = min(self.indexed, len(tokens))
        if self.seen[:keep] != tokens[:keep]:  # compared at C speed; else find where they part
            keep = next(i for i in range(keep) if self.seen[i] != tokens[i])
        for p in range(self.indexed - 1, keep - 1, -1):
            for n in self.sizes:
                if p >= n:
                    key, before = tuple(self.seen[p - n:p]), self.replaced[n][p]
                    if before < 0:
                        del self.index[key]
                    else:
                        self.index[key] = before
        del self.seen[keep:]
        for n in self.sizes:
            del self.replaced[n][keep:]

    def draft(self, context: list[int], k: int, sampler: Sampler | None = None) -> tuple[list[int], None]:
        """Up to k tokens to follow `context`, the document, the conversation and the answer so far (point masses:
        no probabilities)."""
        self.extend(context, len(context))
        for n in self.sizes:
            p = self.index.get(tuple(context[-n:]))
            if p is not None:
                return context[p:p + k], None
        return [], None

    def ready(self, context: list[int]) -> bool:
        """Whether it has a draft to follow `context`."""
        return bool(self.draft(context, 1)[0])


def frequent_ids(document: list[int], n: int, vocab: int, keep: set[int]) -> torch.Tensor:
    """FR-Spec's vocabulary: the n token ids the draft head keeps, ascending [n].

    The `keep` ids (end of turn) first, then the ids counted in the current document, most frequent first, then the
    built-in general table: ids in vocabulary order. Byte-level BPE vocabularies number their tokens in merge order
    and sentencepiece ones by score, so a lower id is a more frequent piece of the tokenizer's training text; the
    table therefore needs no data file.
    """
    chosen = dict.fromkeys(t for t in keep if t < vocab)  # an ordered set
    chosen.update(dict.fromkeys(t for t, _ in Counter(t for t in document if t < vocab).most_common()))
    ids = list(chosen)[:n]
    if len(ids) < n:
        taken = set(ids)
        ids += [t for t in range(vocab) if t not in taken][:n - len(ids)]
    return torch.tensor(sorted(ids), dtype=torch.long)


def check_same_vocabulary(draft: Tokenizer, target: Tokenizer, name: str) -> None:
    """Refuse a draft model whose tokenizer does not give every token the target's id."""
    if draft.vocab_size != target.vocab_size:
        raise InferError(f"the draft model {name} has {draft.vocab_size} tokens, the target {target.vocab_size}: "
                         f"a draft model must share the target's tokenizer")
    for i in range(target.vocab_size):
        if draft.id_to_token(i) != target.id_to_token(i):
            raise InferError(f"the draft model {name} has another vocabulary (token {i} is {draft.id_to_token(i)!r}, the "
                             f"target's is {target.id_to_token(i)!r}): a draft model must share the target's tokenizer")


class DraftModel:
    """A smaller model with the target's tokenizer and its own dense KV cache, drafting k tokens autoregressively,
    each step a (CUDA-graphed) decode pass. Its cache keeps the drafts it decoded, so after a verification it
    lacks only the token or two the target added, caught up in one such pass; a new turn's prompt is prefilled."""

    def __init__(self, checkpoint: Checkpoint, cfg: ModelConfig, target_vocab: int, device: torch.device,
                 dtype: torch.dtype, max_len: int, chunk: int, progress: bool = True, cuda_graphs: bool = True):
        """cfg: the draft checkpoint's config; its tokenizer must be the target's (check_same_vocabulary)."""
        self.model = load_model(checkpoint, cfg, device, dtype, progress=progress)
        cfg = self.model.cfg
        self.cache = self.model.new_cache(min(max_len, cfg.max_position_embeddings))
        self.decode = GraphedDecode(self.model, self.cache, cuda_graphs)
        self.tokens: list[int] = []  # the tokens whose keys and values the draft cache holds
        self.device = device
        self.chunk = chunk  # tokens per forward pass while catching up with a long context
        self.full_head = self.model.lm_head  # [V_draft, hidden]
        self.vocab = min(cfg.vocab_size, target_vocab)  # ids past the shared range (padding rows) are never drafted
        self.target_vocab = target_vocab
        self.ids = None if cfg.vocab_size == target_vocab else torch.arange(self.vocab, device=device)
        self.restrict(self.ids)

    def ready(self, context: list[int]) -> bool:
        return True

    def restrict(self, ids: torch.Tensor | None) -> None:
        """Keep only the LM-head rows of token ids [N] (FR-Spec); None keeps all of them."""
        self.ids = ids
        self.decode.clear()  # graphs read the head they were captured with
        if ids is None:
            self.model.lm_head = self.full_head
            return
        self.model.lm_head = self.full_head.rows(ids)

    def draft(self, context: list[int], k: int, sampler: Sampler) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens following `context`, and at temperature > 0 the probabilities each was drawn from
        [k, V_target] (None at temperature 0: the drafts are the argmax)."""
        k = min(k, self.cache.max_len + 1 - len(context))
        if k < 1:
            return [], None
        keep = reusable_prefix(self.tokens, context)
        if len(context) - keep <= DECODE_MAX_QUERIES:  # after a verification: the token or two the target added
            self.cache.truncate(keep)
            del self.tokens[keep:]
            logits = self.decode(torch.tensor(context[keep:], device=self.device))[-1:]  # [1, N], a graph replay
            self.tokens += context[keep:]
        else:  # a new turn's prompt
            logits = prefill(self.model, self.cache, self.tokens, context, keep, self.chunk)  # [1, N]
        drafts, probs = [], []
        for i in range(k):
            if i:
                logits = self.decode(torch.tensor(drafts[-1:], device=self.device))
                self.tokens.append(drafts[-1])
            if sampler.params.greedy:
                choice = int(logits[0].argmax())
            else:
                q = probabilities(logits[0], sampler.params)  # [N]
                choice = int(torch.multinomial(q, 1, generator=sampler.generator))
                probs.append(self._scatter(q))
            drafts.append(choice if self.ids is None else int(self.ids[choice]))
        return drafts, torch.stack(probs) if probs else None

    def _scatter(self, q: torch.Tensor) -> torch.Tensor:
        """Probabilities over the kept ids [N] as a distribution over the target's vocabulary [V_target]."""
        full = torch.zeros(self.target_vocab, device=q.device)
        if self.ids is None:
            full[:q.numel()] = q
        else:
            full[self.ids] = q
        return full


class Speculator:
    """The drafters of one Engine and when they draft. Per step a lookup hit wins (it costs nothing); otherwise the
    draft model drafts; each drafts only what `plan` says pays, and backs off after a failure."""

    def __init__(self, cfg: SpeculativeConfig, model: DraftModel | None, eos_ids: set[int], draft_cost: float):
        """draft_cost: the fixed model's cost of a draft-model token relative to a target step (PassCost)."""
        self.cfg, self.model, self.eos_ids = cfg, model, eos_ids
        self.drafters: dict[str, tuple[NgramLookup | DraftModel, Acceptance]] = {}  # by name, in order of preference
        self.lookup = NgramLookup()  # kept across turns: each rewinds it to the prefix the new prompt shares
        self.cost = PassCost.model(draft_cost)
        self.measured: dict[tuple, PassCost] = {}  # by context band (calibrate)
        self.last = ""  # the drafter of the latest proposal

    def begin(self, prompt: list[int]) -> str:
        """Start a turn whose input is `prompt` (the n-grams are indexed as it prefills: `index`); returns the
        drafters on, joined by '+' ('' for none)."""
        use_lookup = self.cfg.lookup if self.cfg.lookup is not None else len(prompt) >= LOOKUP_MIN_PROMPT
        if self.model is not None and self.cfg.fr_spec is not None:
            ids = frequent_ids(prompt, self.cfg.fr_spec, self.model.vocab, self.eos_ids)
            self.model.restrict(ids.to(self.model.device))
        if use_lookup:
            self.lookup.rewind(prompt)
        self.drafters = {name: (drafter, Acceptance()) for name, drafter in
                         (("lookup", self.lookup if use_lookup else None), ("draft", self.model)) if drafter}
        return "+".join(self.drafters)

    def index(self, prompt: list[int], upto: int) -> None:
        """Index the n-grams of prompt[:upto] for lookup (called as each prompt chunk is queued)."""
        if "lookup" in self.drafters:
            self.drafters["lookup"][0].extend(prompt, upto)

    def calibrate(self, decode: GraphedDecode) -> None:
        """Take the pass costs at the cache's length: on CUDA graphs measured, once per context band (attention
        path and length within a power of two); elsewhere the fixed model."""
        if not decode.enabled:
            return
        length = decode.cache.length
        band = (uses_sparse(decode.cache, length + 1), length.bit_length())
        draft = self.model.decode if self.model else None
        if band not in self.measured and length + DECODE_MAX_QUERIES < decode.cache.max_len and (
                draft is None or draft.cache.length < draft.cache.max_len):
            self.measured[band] = PassCost.measure(decode, draft)
        self.cost = self.measured.get(band, self.cost)

    def ready(self, context: list[int]) -> bool:
        """After a plain step that cached `context`: whether a drafter would draft now (their waits count down)."""
        found = False
        for drafter, record in self.drafters.values():
            record.wait = max(0, record.wait - 1)
            found = found or (record.wait == 0 and drafter.ready(context))
        return found

    def propose(self, context: list[int], room: int, sampler: Sampler) -> tuple[list[int], torch.Tensor | None]:
        """Drafts to follow `context` (at most `room`) and their draft probabilities [k, V] (None: point masses);
        none when no drafter's draft pays for its pass."""
        self.last = ""
        for name, (drafter, record) in self.drafters.items():
            if record.wait or room < 1:
                record.wait = max(0, record.wait - 1)  # this step counts as one it waits
                continue
            draft_cost = self.cost.draft_token if name == "draft" else 0.0
            k = min(room, self.cfg.max_draft)
            if name == "lookup":  # free: see what it has, then keep what pays
                drafts, q = drafter.draft(context, k, sampler)
                k = len(drafts)
                if not k:  # nothing to draft here: plain steps, no backoff (a miss costs no pass)
                    continue
            k = max(plan(record.rate, k, self.cost, draft_cost), min(k, int(record.probing)))
            if k == 0:
                record.fail()
                continue
            self.last = name
            return drafter.draft(context, k, sampler) if name == "draft" else (drafts[:k], q)
        return [], None

    def verified(self, drafted: int, accepted: int) -> None:
        """After verifying the latest proposal (drafted > 0): update its drafter's record."""
        self.drafters[self.last][1].verified(drafted, accepted)


def accept_greedy(logits: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[int, int]:
    """`verify` at temperature 0 without a repetition penalty, on the device with one host read: logits [W, V] of
    the pass fed ids [W] (a token, its n drafts, any padding)."""
    choice = logits.argmax(-1)  # [W]: the target's token after each fed one
    accepted = (choice[:n] == ids[1:n + 1]).int().cumprod(0).sum()  # the drafts before the first mismatch
    accepted, following = torch.stack([accepted, choice[accepted]]).tolist()
    return accepted, following


def verify(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, sampler: Sampler,
           history: torch.Tensor) -> tuple[int, int]:
    """Accept a prefix of `drafts` against the target; returns (drafts accepted, the token that follows them).

    logits [k+1, V]: row i is the target's distribution after the fed token and drafts[:i]. q [k, V]: the
    probabilities each draft was drawn from, None for point masses (lookup, or any drafter at temperature 0).
    history [N]: the ids the repetition penalty sees before drafts[0].

    Temperature 0: drafts are kept while they equal the target's greedy choice, then the target's own choice
    follows, so the output is token for token that of plain greedy decoding. Above it, standard speculative
    sampling (Leviathan et al. 2023, Chen et al. 2023) on the same processed distribution p the plain sampler
    uses (temperature, top-k, top-p, min-p, repetition penalty): draft x is accepted with probability
    min(1, p(x) / q(x)); on rejection the token is drawn from norm(max(0, p - q)); after k acceptances from the last
    row. Every emitted token is then distributed exactly as the target's.
    """
    params = sampler.params
    for i, x in enumerate(drafts):
        if params.greedy:
            choice = sampler(logits[i], history)
            if choice != x:
                return i, choice
        else:
            p = probabilities(apply_repetition_penalty(logits[i], history, params.repetition_penalty), params)  # [V]
            qx = 1.0 if q is None else float(q[i, x])
            u = float(torch.rand((), generator=sampler.generator, device=p.device))
            if u * qx >= float(p[x]):  # rejected
                if q is None:  # max(0, p - q) for a point mass q at x: p without x
                    residual = p.clone()
                    residual[x] = 0.0
                else:
                    residual = (p - q[i]).clamp_(min=0.0)  # [V]
                return i, int(torch.multinomial(residual / residual.sum(), 1, generator=sampler.generator))
        if params.repetition_penalty != 1.0:
            history = torch.cat([history, torch.tensor([x], device=history.device)])
    return len(drafts), sampler(logits[len(drafts)], history)
