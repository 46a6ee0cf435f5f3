"""Memory sizing before anything is allocated: the weights, the KV cache with its key summaries and the working memory
of a prefill chunk, against what the device has free. The context is fitted to it, or refused with the numbers."""

import ctypes
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import ModelConfig, SparseConfig
from .device import free_memory
from .errors import InferError, ParameterError

GB = 1e9
MIN_CONTEXT = 256  # a fitted context below this is refused: the model would be of no use
CONTEXT_STEP = 1024  # a fitted context is rounded down to a multiple of this
SLACK_BYTES = 512 << 20  # allocator rounding, library workspaces (cuBLAS), small buffers
USABLE = 0.9  # of the free memory: the rest stays for other processes and fragmentation
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter: blocks of at least this size get a mapping of their own
LOADING_MMAP_THRESHOLD = 128 << 10  # while weights load (glibc's initial value)
RUNNING_MMAP_THRESHOLD = 32 << 20  # after (the ceiling glibc's own adjustment reaches)


@contextmanager
def freed_when_loaded():
    """Host memory that loading weights frees goes back to the system. glibc raises its mmap threshold after each
    large block freed, so that loading a model tensor by tensor left its temporaries' memory in the heap, resident
    and unused (0.75 GB of the Qwen demo's 4.1 GB on the CPU, BENCHMARKS.md); during the load, blocks from 128 KiB
    get their own mappings, unmapped when freed. After it the threshold is fixed high: prefill's large temporaries
    come from the heap again (mapped afresh each time, they made CPU prefill 11% slower). Elsewhere than glibc:
    nothing changes."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, RUNNING_MMAP_THRESHOLD)


@dataclass
class ModelMemory:
    """The bytes one model takes: fixed (weights and a prefill chunk's working memory) and per cached token."""

    weights: int
    work: int
    per_token: int  # keys, values and key summaries of one position, all layers

    def total(self, context: int) -> int:
        return self.weights + self.work + self.per_token * context


def model_memory(cfg: ModelConfig, weight_bytes: int, dtype: torch.dtype, chunk: int,
                 sparse: SparseConfig | None, tp: int = 1) -> ModelMemory:
    """What a model of `cfg` whose weights take weight_bytes needs, with activations in `dtype`, prefill chunks of
    `chunk` tokens and a KV cache with summaries when sparse; its 1/tp share of the KV heads under tensor
    parallelism."""
    kv_heads = cfg.num_kv_heads // tp
    kv = 2 * cfg.num_layers * kv_heads * cfg.head_dim
    summaries = 0 if sparse is None else cfg.num_layers * kv_heads * cfg.head_dim / sparse.kernel_stride
    # a chunk's activations in float32 at most: the residual stream and norms, q/k/v, gate/up and the activation
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    work = chunk * (4 * cfg.hidden_size + 2 * qkv + 3 * cfg.intermediate_size) * 4 + cfg.vocab_size * 4 * 8
    return ModelMemory(weight_bytes, work, int((kv + summaries) * dtype.itemsize + 1))


def check_context(requested: int, model_context: int) -> None:
    """A requested KV cache length (--max-context) holds 2 tokens or more, and no more than the model's context."""
    if requested < 2:
        raise ParameterError("max_context", f"must be at least 2 tokens, got {requested}")
    if requested > model_context:
        raise ParameterError("max_context", f"{requested} is beyond the model's context of {model_context} tokens")


def fit_context(models: list[ModelMemory], device: torch.device, requested: int | None,
                model_context: int) -> tuple[int, str]:
    """The KV cache length every one of `models` gets: `requested` (checked against the model's context and the free
    memory), or by default the model's context, lowered to what fits. Returns it with a note ("" when nothing was
    lowered) that says why it was lowered."""
    if requested is not None:
        check_context(requested, model_context)
    free = int(free_memory(device) * USABLE) - SLACK_BYTES
    fixed = sum(m.weights + m.work for m in models)
    per_token = sum(m.per_token for m in models)
    if fixed + per_token * MIN_CONTEXT > free:
        raise InferError(f"the weights need {fixed / GB:.1f} GB with their working memory and {device.type} has "
                         f"{free / GB:.1f} GB free: use a smaller model" +
                         (" or a smaller dtype (bfloat16)" if device.type == "cpu" else ""))
    fits = (free - fixed) // per_token
    if requested is not None:
        if requested > fits:
            raise ParameterError("max_context", f"{requested} tokens need {per_token * requested / GB:.1f} GB of KV "
                                                f"cache besides {fixed / GB:.1f} GB of weights; {free / GB:.1f} GB "
                                                f"are free on {device.type}, enough for {fits} tokens")
        return requested, ""
    if model_context <= fits:
        return model_context, ""
    fitted = max(MIN_CONTEXT, fits // CONTEXT_STEP * CONTEXT_STEP)
    return fitted, (f"the KV cache holds {fitted} tokens, not the model's {model_context}: "
                    f"{free / GB:.1f} GB are free on {device.type} for {fixed / GB:.1f} GB of weights "
                    f"and {per_token * model_context / GB:.1f} GB of cache")
