"""CUDA graphs of the decode-sized forward passes (one token, or a token and its drafts under verification).

Eager decoding is bound by the host: hundreds of kernel launches per token. A graph launches them all at once.
Each pass is captured on first use for its key (token count, attention path of each query, rope variant), then
replayed with the tokens and the positions in static buffers; every kernel of the pass reads positions from device
tensors (see kv_cache.Positions), so one graph serves every position on the same path. Each pass also moves the
positions on by its tokens, and a one-token pass writes its logits' argmax into the token buffer: greedy decoding
replays pass after pass with nothing between them (`greedy_next`).
"""

import torch

from infer.kernels import gemv

from .attention import DECODE_MAX_QUERIES, SelectionRecord, uses_sparse
from .kv_cache import KVCache, Positions
from .model import Transformer
from .parallel import DECODE


class GraphedDecode:
    """model(tokens, cache, num_logits=len(tokens)), replayed from CUDA graphs where they apply (CUDA, enabled, no
    use_nope, at most DECODE_MAX_QUERIES tokens) and run eagerly otherwise."""

    def __init__(self, model: Transformer, cache: KVCache, enabled: bool = True):
        self.model, self.cache = model, cache
        self.enabled = enabled and cache.k.is_cuda and not (cache.sparse is not None and cache.sparse.use_nope)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, SelectionRecord]] = {}
        self.record = SelectionRecord()  # the latest pass's sparse selection (stats): a graph's own buffers
        if not self.enabled:
            return
        device = cache.k.device
        self.tokens = torch.zeros(DECODE_MAX_QUERIES, dtype=torch.long, device=device)  # [T_max] static input
        # [2, T_max] int32: the positions of tokens[0..] (kv_cache.Positions.ids32), then the keys each sees (ends)
        self.positions = torch.zeros(2, DECODE_MAX_QUERIES, dtype=torch.int32, device=device)
        steps = torch.arange(DECODE_MAX_QUERIES, dtype=torch.int32, device=device)  # [T_max]
        self.offsets = torch.stack([steps, steps + 1])  # [2, T_max]: positions at start 0
        self.device_start: int | None = None  # positions[0, 0] once the queued passes ran (None: unknown)
        self.argmax = gemv.argmax_buffer(device)
        self.memory = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at the same time

    @property
    def greedy_next(self) -> torch.Tensor:
        """[1] on the device: the argmax of the latest one-token pass's logits, once it ran. It is the token
        buffer itself, so `self(self.greedy_next)` feeds it to the next pass without a copy."""
        return self.tokens[:1]

    def clear(self) -> None:
        """Forget the graphs (they hold the weights they were captured with: call after swapping a weight)."""
        self.graphs.clear()

    def key(self, num_tokens: int) -> tuple:
        """What the host decides in a pass at the cache's current length: a graph is valid for one key."""
        start = self.cache.length
        paths = tuple(uses_sparse(self.cache, start + i + 1) for i in range(num_tokens))
        return num_tokens, paths, self.model.rope.variant(start + num_tokens)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] (float32) of tokens [T] at positions cache.length..; a replay's are overwritten by the next."""
        num_tokens, start = tokens.shape[0], self.cache.length
        if self.model.parallel is not None:  # the followers of a tensor-parallel group run the same pass
            own = self.enabled and tokens.data_ptr() == self.tokens.data_ptr()  # greedy_next: theirs is the same
            self.model.parallel.announce(DECODE, self.cache, tokens, from_buffer=own)
        if not self.enabled or num_tokens > DECODE_MAX_QUERIES:
            self.record = SelectionRecord()
            return self.model(tokens, self.cache, num_logits=num_tokens, record=self.record)
        if tokens.data_ptr() != self.tokens.data_ptr():
            self.tokens[:num_tokens].copy_(tokens, non_blocking=True)
        if self.device_start != start:  # rolled back, or first use
            torch.add(self.offsets, start, out=self.positions)
        key = self.key(num_tokens)
        if key not in self.graphs:
            self.graphs[key] = self._capture(num_tokens)
        graph, logits, self.record = self.graphs[key]
        graph.replay()
        self.cache.length = self.device_start = start + num_tokens
        return logits

    def _pass(self, num_tokens: int, record: SelectionRecord) -> torch.Tensor:
        ids, ends = self.positions[:, :num_tokens]  # [T] each
        pos = Positions(self.cache.length, ids, ids, ends)
        one = num_tokens == 1
        logits = self.model(self.tokens[:num_tokens], self.cache, num_logits=num_tokens, pos=pos,
                            argmax=self.argmax if one else None, record=record)
        if one:
            gemv.take_argmax(self.argmax, self.tokens[:1], advance=self.positions)
        else:
            self.positions += num_tokens
        return logits

    def _capture(self, num_tokens: int):
        """Capture the pass of `num_tokens` tokens; the inputs are as found after (the warm-up ran the pass)."""
        start, inputs = self.cache.length, (self.tokens.clone(), self.positions.clone())
        record = SelectionRecord()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture: compiles the Triton kernels, sets up cuBLAS
            self._pass(num_tokens, record)  # writes this pass's keys and values, which the replay rewrites identically
            self.cache.length = start
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory):
            logits = self._pass(num_tokens, record)
        self.cache.length = start
        self.tokens.copy_(inputs[0])
        self.positions.copy_(inputs[1])
        return graph, logits, record
