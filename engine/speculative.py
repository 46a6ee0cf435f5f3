"""Speculative decoding: cheap drafters propose tokens, the target checks them all in one forward pass.

Drafters, chosen per step: n-gram prompt lookup (what followed the latest earlier occurrence of the context's last
n-gram: free, and strong when the answer copies from the document) and otherwise a draft model (a smaller model with
the target's tokenizer, optionally with FR-Spec's pruned LM head). The target scores the drafted positions plus one
through its own KV cache and attention path; `verify` keeps the prefix it agrees with and the cache is truncated
past it (key summaries are a pure function of the keys, so truncation is the whole rollback).

A verification pass gives the logits one-token steps would give, up to float rounding: under sparse attention each
of its k+1 queries selects its own blocks, as it would decoded alone (attention.attend), so greedy output equals
plain greedy output with sparse attention on and off.
"""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import DECODE_MAX_QUERIES
from .config import ModelConfig
from .cuda_graph import GraphedDecode
from .errors import InferError, ParameterError
from .sampling import Sampler, apply_repetition_penalty, probabilities
from .tokenizer import Tokenizer
from .model import prefill, reusable_prefix
from .weights import Checkpoint, load_model

MAX_DRAFT = DECODE_MAX_QUERIES - 1  # drafted tokens per step: the k + 1 queries verified fit the decode path
LOOKUP_MIN_PROMPT = 1024  # lookup=None turns n-gram lookup on for prompts at least this long
NGRAM_SIZES = (4, 3, 2)  # lookup tries the longest n-gram first


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
class DraftLength:
    """How many tokens a drafter proposes next: +2 after a fully accepted draft, -1 after a rejection (as
    Hugging Face's assisted generation), so k follows the drafter's recent acceptance."""

    k: int
    max_k: int

    def update(self, drafted: int, accepted: int) -> None:
        self.k = min(self.max_k, self.k + 2) if accepted == drafted else max(1, self.k - 1)


class NgramLookup:
    """Prompt lookup decoding: propose the tokens that followed the latest earlier occurrence of the last n-gram."""

    def __init__(self, sizes: tuple[int, ...] = NGRAM_SIZES):
        self.sizes = sizes
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> the position right after its latest occurrence
        self.indexed = 0  # the context's first `indexed` tokens are in the index

    def draft(self, context: list[int], k: int) -> list[int]:
        """context: the document, the conversation and the answer so far; it only grows between calls."""
        for p in range(self.indexed, len(context)):
            for n in self.sizes:
                if p >= n:
                    self.index[tuple(context[p - n:p])] = p
        self.indexed = len(context)
        for n in self.sizes:
            p = self.index.get(tuple(context[-n:]))
            if p is not None:
                return context[p:p + k]
        return []


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
    """A smaller model with the target's tokenizer and its own dense KV cache, drafting k tokens autoregressively."""

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
        logits = prefill(self.model, self.cache, self.tokens, context, reusable_prefix(self.tokens, context),
                         self.chunk)  # [1, N]
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
    """The drafters of one Engine. Per step a lookup hit wins (it costs nothing); otherwise the draft model drafts."""

    def __init__(self, cfg: SpeculativeConfig, model: DraftModel | None, eos_ids: set[int]):
        self.cfg, self.model, self.eos_ids = cfg, model, eos_ids
        self.ngrams: NgramLookup | None = None
        self.lengths: dict[str, DraftLength] = {}
        self.last = ""  # the drafter of the latest proposal

    def begin(self, prompt: list[int]) -> str:
        """Start a turn whose input is `prompt`; returns the drafters on, joined by '+' ('' for none)."""
        use_lookup = self.cfg.lookup if self.cfg.lookup is not None else len(prompt) >= LOOKUP_MIN_PROMPT
        self.ngrams = NgramLookup() if use_lookup else None
        if self.model is not None and self.cfg.fr_spec is not None:
            ids = frequent_ids(prompt, self.cfg.fr_spec, self.model.vocab, self.eos_ids)
            self.model.restrict(ids.to(self.model.device))
        k = self.cfg.max_draft
        self.lengths = {name: DraftLength(k, k) for name, on in
                        (("lookup", use_lookup), ("draft", self.model is not None)) if on}
        return "+".join(self.lengths)

    def propose(self, context: list[int], room: int, sampler: Sampler) -> tuple[list[int], torch.Tensor | None]:
        """Drafts to follow `context` (at most `room`) and their draft probabilities [k, V] (None: point masses)."""
        self.last = ""
        if room < 1:
            return [], None
        if self.ngrams is not None:
            drafts = self.ngrams.draft(context, min(room, self.lengths["lookup"].k))
            if drafts:
                self.last = "lookup"
                return drafts, None
        if self.model is not None:
            self.last = "draft"
            return self.model.draft(context, min(room, self.lengths["draft"].k), sampler)
        return [], None

    def update(self, drafted: int, accepted: int) -> None:
        """After verifying the latest proposal (drafted > 0): adapt that drafter's k."""
        self.lengths[self.last].update(drafted, accepted)


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
