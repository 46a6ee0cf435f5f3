"""The one stepping loop every front end drives: prefill the new tokens, then sample, stream text and count."""

import copy
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .attention import latest_read
from .config import SparseConfig, sparse_config
from .cuda_graph import GraphedDecode
from .device import PendingInt, parse_device, parse_dtype, synchronize
from .errors import ContextOverflow, InferError
from .memory import fit_context, model_memory
from .parallel import Parallel, check_split, follow, launch, share_int, world_size
from .sampling import Sampler, SamplingParams
from .speculative import (MAX_DRAFT, DraftModel, SpeculativeConfig, Speculator, accept_greedy, check_same_vocabulary,
                          pass_width, verify)
from .tokenizer import StreamDecoder
from .model import prefill, reusable_prefix
from .weights import Checkpoint, load_model

PREFILL_CHUNK = 4096  # tokens per forward pass while prefilling: bounds the activations of long prompts


@dataclass
class Stats:
    prompt_tokens: int = 0  # tokens prefilled in this turn
    reused_tokens: int = 0  # prompt tokens whose keys and values were already cached
    prefill_seconds: float = 0.0
    first_token_seconds: float = 0.0  # from the call to the first sampled token
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # after the first token
    stop_reason: str = ""  # "end of turn", "stop string", "max tokens", "context full", "interrupted"
    attention: str = "dense"  # the attention path of the last decoded token: "dense" or "sparse"
    kv_read: float = 1.0  # fraction of the cached keys and values the last decoded token attended
    speculative: str = ""  # the drafters on in this turn ("lookup", "draft", "lookup+draft"); "" when off
    target_steps: int = 0  # target forward passes after the first token: plain steps and verification passes
    verify_steps: int = 0  # the passes that verified drafts
    drafted_tokens: int = 0
    accepted_tokens: int = 0  # drafts the target accepted
    draft_seconds: float = 0.0  # time spent drafting, part of decode_seconds
    verify_seconds: float = 0.0  # time in verification passes, from queueing one to reading its result
    wait_seconds: float = 0.0  # time the host waited for the device's results (the rest of decode is host work)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens each target forward pass produced: the accepted drafts plus the target's own token."""
        return (self.accepted_tokens + self.target_steps) / self.target_steps if self.target_steps else 0.0

    def share(self, seconds: float) -> float:
        """seconds as a share of decode_seconds."""
        return min(1.0, seconds / self.decode_seconds) if self.decode_seconds else 0.0

    def record(self) -> dict:
        """The fields and the derived rates, for --stats-json."""
        return {**asdict(self), "prefill_tps": self.prefill_tps, "decode_tps": self.decode_tps,
                "acceptance_rate": self.acceptance_rate, "tokens_per_step": self.tokens_per_step,
                "draft_share": self.share(self.draft_seconds), "verify_share": self.share(self.verify_seconds),
                "host_share": 1.0 - self.share(self.wait_seconds)}

    def line(self) -> str:
        speculative = (
            f" | speculative ({self.speculative}): {100 * self.acceptance_rate:.0f}% of {self.drafted_tokens} drafted "
            f"accepted, {self.tokens_per_step:.2f} tok/step, {self.verify_steps} of {self.target_steps} steps "
            f"verified; of decode {100 * self.share(self.draft_seconds):.0f}% drafting, "
            f"{100 * self.share(self.verify_seconds):.0f}% verifying, {100 - 100 * self.share(self.wait_seconds):.0f}% "
            f"on the host"
        ) if self.speculative else ""
        return (
            f"prompt {self.prompt_tokens} tok ({self.reused_tokens} reused) at {self.prefill_tps:.1f} tok/s | "
            f"first token {self.first_token_seconds * 1000:.0f} ms | "
            f"generated {self.generated_tokens} tok at {self.decode_tps:.1f} tok/s | "
            f"{self.attention} attention, {100 * self.kv_read:.0f}% of KV read per token{speculative} | "
            f"stopped: {self.stop_reason}"
        )


class Engine:
    """A loaded model, its tokenizer and one KV cache that persists across calls (prefix reuse between turns)."""

    def __init__(self, model_dir: Path, device: str | None = None, dtype: str | None = None,
                 max_context: int | None = None, sparse: dict | None = None, progress: bool = True,
                 draft: Path | None = None, lookup: bool | None = None, fr_spec: int | None = None,
                 max_draft: int = MAX_DRAFT, cuda_graphs: bool = True, quantize: str | None = None, tp: int = 1,
                 variants: list[dict] = ()):
        """sparse: overrides of the model's sparse_config (mode, topk, block_size, window_size, dense_len, ...).
        variants: more sparse overrides, each for an Engine of its own over the same model with a KV cache of its
        own (self.variants; `infer eval` compares dense attention with sparse so, the weights loaded once).
        draft, lookup, fr_spec, max_draft: speculative decoding, see speculative.SpeculativeConfig.
        cuda_graphs: replay decode steps from CUDA graphs (on CUDA; False runs them eagerly).
        quantize: "int8" or "int4": a float checkpoint's matrices quantized as they load (weights.QUANTIZE).
        tp: tensor-parallel ranks (engine/parallel.py): this process is rank 0 and starts the others, unless
        torchrun started them all (then a rank other than 0 follows rank 0 here and exits when it is done).
        Everything is checked before the weights load: a bad value raises InferError (ParameterError naming the
        parameter), and so does a model that does not fit the device's free memory. max_context None: the model's
        context, lowered to what fits (then context_note says so)."""
        speculative = SpeculativeConfig(draft, lookup, fr_spec, max_draft)
        self.device = parse_device(device)
        dtype = parse_dtype(dtype, self.device)
        checkpoint = Checkpoint(model_dir)
        self.model_dir = checkpoint.path
        cfg = checkpoint.config()
        self.sparse = sparse_config(cfg.sparse, **(sparse or {}))  # None: dense attention only
        self.defaults = checkpoint.generation_defaults()
        self.tokenizer = checkpoint.tokenizer()
        others = [sparse_config(cfg.sparse, **v) for v in variants]
        tp = world_size(tp)
        check_split(tp, cfg)
        packed = self.device.type == "cuda"  # quantized weights stay in their blocks (engine/linear.py)
        weight_bytes = checkpoint.weight_bytes(cfg, dtype, packed, quantize) // tp
        needs = [model_memory(cfg, weight_bytes, dtype, PREFILL_CHUNK, self.sparse, tp)]
        needs += [model_memory(cfg, 0, dtype, 0, other, tp) for other in others]  # the variants' caches
        drafter = None
        if draft is not None:
            drafter = Checkpoint(draft)
            check_same_vocabulary(drafter.tokenizer(), self.tokenizer, drafter.path.name)
            draft_cfg = drafter.config()
            draft_bytes = drafter.weight_bytes(draft_cfg, dtype, packed)
            needs.append(model_memory(draft_cfg, draft_bytes, dtype, PREFILL_CHUNK, None))
        self.model_context = cfg.max_position_embeddings
        self.max_len, self.context_note = fit_context(needs, self.device, max_context, self.model_context)
        self.parallel = launch(tp, self.device, follower, (model_dir, dtype, [sparse, *variants], cuda_graphs,
                                                           quantize))
        if self.parallel is not None:
            share_int(self.parallel, self.max_len)
            self.device = self.parallel.device
        self.model = load_model(checkpoint, cfg, self.device, dtype, progress=progress, quantize=quantize,
                                parallel=self.parallel)
        self.cache = self.model.new_cache(self.max_len, self.sparse)
        self.decode = GraphedDecode(self.model, self.cache, cuda_graphs)
        self.tokens: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.stats = Stats()
        self.speculator = None
        if speculative.enabled:
            draft_model = DraftModel(drafter, draft_cfg, cfg.vocab_size, self.device, dtype, self.max_len,
                                     PREFILL_CHUNK, progress, cuda_graphs) if drafter is not None else None
            # a draft token costs what reading its weights does, against a target step (PassCost's fixed model)
            draft_cost = draft_bytes / weight_bytes if drafter is not None else 0.0
            self.speculator = Speculator(speculative, draft_model, self.eos_ids, draft_cost)
        self.variants = [self._variant(other, cuda_graphs) for other in others]
        if self.parallel is not None:
            self.parallel.caches = [self.cache] + [v.cache for v in self.variants]

    def _variant(self, sparse: SparseConfig | None, cuda_graphs: bool) -> "Engine":
        """This engine's model and tokenizer with a KV cache of its own under other sparse settings."""
        other = copy.copy(self)
        other.sparse, other.cache = sparse, self.model.new_cache(self.max_len, sparse)
        other.decode, other.tokens, other.stats = GraphedDecode(self.model, other.cache, cuda_graphs), [], Stats()
        return other

    def sampling_params(self, **overrides) -> SamplingParams:
        """The model's generation_config defaults, overridden by the given non-None values."""
        values = {k: v for k, v in self.defaults.items() if k in SamplingParams.__dataclass_fields__}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)

    def reset(self) -> None:
        self.cache.truncate(0)
        self.tokens = []

    def prefill(self, tokens: list[int], on_progress=None) -> torch.Tensor:
        """Bring the cache to hold `tokens`, reusing the longest cached prefix; returns the last position's logits [V]."""
        if not tokens:
            raise InferError("the prompt has no tokens: nothing to answer")
        if len(tokens) >= self.max_len:
            raise ContextOverflow(len(tokens), self.max_len, self.model_context)
        reuse = reusable_prefix(self.tokens, tokens)
        self.stats = Stats(prompt_tokens=len(tokens) - reuse, reused_tokens=reuse)
        logits = prefill(self.model, self.cache, self.tokens, tokens, reuse, PREFILL_CHUNK, on_progress, self.decode)
        return logits[-1]

    def generate(self, tokens: list[int], params: SamplingParams, on_progress=None) -> Iterator[str]:
        """Stream the text of the answer to `tokens` (the whole conversation so far); self.stats tracks the turn."""
        start = time.perf_counter()
        drafters = self.speculator.begin(tokens) if self.speculator is not None else ""

        def progress(done: int, total: int) -> None:  # a prompt chunk is queued: index it while the device runs it
            if drafters:
                self.speculator.index(tokens, len(tokens) - total + done)
            if on_progress:
                on_progress(done, total)

        logits = self.prefill(tokens, progress)
        synchronize(self.device)
        self.stats.prefill_seconds = time.perf_counter() - start
        sampler = Sampler(params, self.device)
        decoder = StreamDecoder(self.tokenizer)
        text, emitted = "", 0  # the answer so far; how much of it has been yielded
        stats = self.stats
        stats.stop_reason = "max tokens"
        stats.speculative = drafters
        first = sampler.sample(logits, torch.tensor(tokens, dtype=torch.long, device=self.device))  # [1]
        answer = self._answer(first, sampler)
        done = len(tokens)  # the prompt and the answer tokens the answer went on past: what the cache keeps
        try:
            for token in answer:
                stats.generated_tokens += 1
                if stats.generated_tokens == 1:
                    stats.first_token_seconds = time.perf_counter() - start
                    first_token_time = time.perf_counter()
                else:
                    stats.decode_seconds = time.perf_counter() - first_token_time
                if token in self.eos_ids:
                    stats.stop_reason = "end of turn"
                    break
                text += decoder.push(token)
                end, stopped = _visible_end(text, params.stop)
                if end > emitted:
                    yield text[emitted:end]
                    emitted = end
                if stopped:
                    stats.stop_reason = "stop string"
                    break
                if stats.generated_tokens >= params.max_tokens:
                    break
                if done + 1 >= self.max_len:
                    stats.stop_reason = "context full"
                    break
                done += 1  # the answer goes on past this token: it stays cached
            if stats.stop_reason != "stop string":
                text += decoder.flush()
                if len(text) > emitted:
                    yield text[emitted:]
        except GeneratorExit:
            stats.stop_reason = "interrupted"
            raise
        finally:
            answer.close()
            del self.tokens[done:]  # accepted drafts, or a pass queued ahead, that the answer did not reach
            self.cache.truncate(len(self.tokens))
            self.stats.attention, self.stats.kv_read = latest_read(self.cache, len(self.tokens), self.decode.record)

    def _answer(self, first: torch.Tensor, sampler: Sampler) -> Iterator[int]:
        """The answer's tokens from `first` (a device tensor [1]) on: plain steps until a drafter would draft, then
        speculative steps until drafting stops paying, and so on. The pass costs are taken (calibrate) only when a
        drafter would draft: a turn where none does pays nothing for them, in its first token or after."""
        token = first
        while token is not None:
            token = yield from self._decode_ahead(token, sampler)
            if token is not None:
                decided = int(token)  # read first: the passes calibrate times reuse the decode graph's buffers
                self.speculator.calibrate(self.decode)  # once per context band, when speculation first pays there
                token = yield from self._speculate(decided, sampler)

    def _history(self, sampler: Sampler) -> torch.Tensor | None:
        """The ids the repetition penalty sees before the next fed token: the cached ones (None: no penalty)."""
        if sampler.params.repetition_penalty == 1.0:
            return None
        return torch.tensor(self.tokens, dtype=torch.long, device=self.device)

    def _decode_ahead(self, token: torch.Tensor, sampler: Sampler) -> Iterator[int]:
        """Plain steps: the tokens from `token` (a device tensor [1]) on, one forward pass each, with the device one
        pass ahead of the caller: the pass feeding a token, and the sampling of the token after it, are queued
        before the token is read back and yielded, so the host's text work overlaps the device's next pass. A fed
        token is in self.tokens; when the caller stops, the pass queued ahead is rolled back with it. Returns the
        next token (a device tensor [1], not fed) once a drafter would draft after the cached ones, None at the
        end of the context."""
        history = self._history(sampler)
        on_device = self.decode.enabled and sampler.params.greedy and history is None  # the graph's argmax is the token
        while True:
            value = PendingInt(token)
            fed = len(self.tokens) + 1 < self.max_len  # else the caller stops at this token: context full
            if fed:
                logits = self.decode(token)  # [1, V]
                self.stats.target_steps += 1
                if history is not None:
                    history = torch.cat([history, token])
                token = self.decode.greedy_next if on_device else sampler.sample(logits[0], history)
            waited = time.perf_counter()
            value = value.get()
            self.stats.wait_seconds += time.perf_counter() - waited
            if fed:
                self.tokens.append(value)
            yield value
            if not fed:
                return None
            if self.stats.speculative and self.speculator.ready(self.tokens):
                return token

    def _speculate(self, token: int, sampler: Sampler) -> Iterator[int]:
        """Speculative steps from `token` (decided, not fed) on: each target pass feeds a token and verifies the
        drafts proposed after it. The pass is queued first; the tokens the last pass accepted and `token` are
        yielded while it runs (the caller's text work overlaps the device's pass), then its result is read.
        Returns the next token (a device tensor [1], not fed) once no drafter drafts, None at the end of the
        context."""
        history = self._history(sampler)
        accepted: list[int] = []  # the last pass's accepted drafts, cached and not yielded yet
        while True:
            room = self.max_len - 2 - len(self.tokens)
            drafts, q = [], None
            if room >= 0:  # else the caller stops at this token: context full
                began = time.perf_counter()
                self.tokens.append(token)  # the drafters' context, for this call only (a copy costs O(context))
                try:
                    drafts, q = self.speculator.propose(self.tokens, room, sampler)
                finally:
                    self.tokens.pop()
                self.stats.draft_seconds += time.perf_counter() - began
            if not drafts:
                yield from accepted
                if room >= 0:
                    return torch.tensor([token], device=self.device)
                yield token
                return None
            if history is not None:
                history = torch.cat([history, torch.tensor([token], device=self.device)])
            queued = self._queue_verify(token, drafts)
            yield from accepted
            yield token
            accepted, token = self._read_verify(queued, token, drafts, q, sampler, history)
            if history is not None:
                history = torch.cat([history, torch.tensor(accepted, dtype=torch.long, device=self.device)])

    def _queue_verify(self, token: int, drafts: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Queue the pass that feeds `token` and its drafts, padded to the next of WIDTHS while that fits the
        cache: (its ids [width], its logits [width, V], when it was queued)."""
        began = time.perf_counter()
        n = len(drafts)
        width = pass_width(n + 1) if len(self.tokens) + pass_width(n + 1) <= self.max_len else n + 1
        ids = torch.tensor([token] + drafts + drafts[-1:] * (width - n - 1), device=self.device)  # [width]
        return ids, self.decode(ids), began

    def _read_verify(self, queued: tuple[torch.Tensor, torch.Tensor, float], token: int, drafts: list[int],
                     q: torch.Tensor | None, sampler: Sampler, history: torch.Tensor | None) -> tuple[list[int], int]:
        """The queued pass's result: the drafts the target accepted (now cached after `token`) and the token after
        them (not cached yet). Greedy acceptance without a penalty runs on the device, one host read."""
        ids, logits, began = queued
        n = len(drafts)
        waited = time.perf_counter()
        if sampler.params.greedy and history is None:
            accepted, following = accept_greedy(logits, ids, n)
        else:
            accepted, following = verify(logits[:n + 1], drafts, q, sampler,
                                         torch.empty(0, dtype=torch.long, device=self.device) if history is None
                                         else history)
        done = time.perf_counter()
        self.cache.truncate(len(self.tokens) + 1 + accepted)  # roll back the rejected drafts and the padding
        self.tokens += [token] + drafts[:accepted]
        self.speculator.verified(n, accepted)
        stats = self.stats
        stats.target_steps += 1
        stats.verify_steps += 1
        stats.drafted_tokens += n
        stats.accepted_tokens += accepted
        stats.wait_seconds += done - waited
        stats.verify_seconds += done - began
        return drafts[:accepted], following


def follower(parallel: Parallel, model_dir: Path, dtype: torch.dtype, sparse: list[dict | None], cuda_graphs: bool,
             quantize: str | None) -> None:
    """A tensor-parallel rank other than 0: load this rank's slice of the model, a cache (the length rank 0 decided)
    and decode graphs for each of rank 0's sparse settings (the engine's, then its variants'), then run the passes
    rank 0 announces (parallel.follow)."""
    checkpoint = Checkpoint(model_dir)
    cfg = checkpoint.config()
    max_len = share_int(parallel)
    model = load_model(checkpoint, cfg, parallel.device, dtype, progress=False, quantize=quantize, parallel=parallel)
    caches = [model.new_cache(max_len, sparse_config(cfg.sparse, **(s or {}))) for s in sparse]
    follow(parallel, model, [(cache, GraphedDecode(model, cache, cuda_graphs)) for cache in caches])


def _visible_end(text: str, stops: list[str]) -> tuple[int, bool]:
    """How much of `text` may be shown: up to a stop string (then True), else all but a possible stop-string prefix."""
    for stop in stops:
        at = text.find(stop)
        if at >= 0:
            return at, True
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return len(text) - hold, False
