"""Tensor parallelism over torch.distributed: N processes, one a GPU (NCCL) or all on the CPU (gloo), each holding a
slice of every layer. Each rank holds Hkv/N KV heads with their query heads (q/k/v split by output rows, o by
input columns), a slice of the MLP (gate/up by rows, down by columns), and a slice of the vocabulary (the embedding
and the LM head, by rows); its KV cache and key summaries hold only its heads, so block selection, which a GQA group
shares, stays local. One all-reduce after o and one after down per layer, one for the embedding, and the LM head's
slices gathered.

Rank 0 runs the engine (the terminal, the tokenizer, sampling, speculation); every other rank runs `follow`: rank 0
announces each pass it runs (a prompt chunk, a decode-sized pass, the KV cache it runs on and the length it starts at)
on a gloo group of its own, and the followers run the same pass on their slices, so that the collectives inside the
model meet. `infer bench` runs without announcements: every rank times the same passes itself. Rank 0 starts the
followers itself (torch.multiprocessing), or torchrun starts them all (WORLD_SIZE, RANK): see `launch`.
"""

import atexit
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import InferError, ParameterError

FORWARD, DECODE, STOP = 1, 2, 3  # the passes rank 0 announces
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer torch's name
HEADER = 6  # op, cache, its length at the start, tokens, logits wanted, decode from the graph's own token buffer
WATCH_SECONDS = 0.5  # how often a rank checks that the others are alive
_watches = []  # rank 0: the checks for a follower that has gone, one a group started here
_reporting = threading.Lock()  # one line says a rank has gone, not two (the watchdog and rank 0's failed collective)


@dataclass
class Parallel:
    """This process's place in a tensor-parallel group of `size` ranks."""

    rank: int
    size: int
    device: torch.device
    control: dist.ProcessGroup | None  # gloo: rank 0's announcements; None: every rank runs the passes itself
    caches: list = field(default_factory=list)  # rank 0: its KV caches, in the order the followers hold theirs

    def split(self, n: int, what: str) -> tuple[int, int]:
        """This rank's [start, stop) of n things split evenly (heads, rows, columns)."""
        if n % self.size:
            raise ParameterError("tp", f"must divide the model's {what} ({n}), got {self.size}")
        share = n // self.size
        return self.rank * share, (self.rank + 1) * share

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(x, op=op)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[T, n] on every rank -> [T, size * n], the ranks' columns side by side."""
        parts = torch.empty((self.size * x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)  # rank-major
        _all_gather(parts, x.contiguous())
        return parts.view(self.size, *x.shape).permute(1, 0, 2).reshape(x.shape[0], -1)

    def announce(self, op: int, cache=None, tokens: torch.Tensor | None = None, num_logits: int = 0,
                 from_buffer: bool = False) -> None:
        """Rank 0: tell the followers the pass it is about to run on `cache` (one of self.caches): its header on the
        control group (host), its tokens on the model's group (on the device, in stream order: no wait for a token
        still being sampled)."""
        if self.rank != 0 or self.control is None:
            return
        n = 0 if tokens is None else tokens.shape[0]
        at = (0, 0) if cache is None else (self.caches.index(cache), cache.length)
        header = torch.tensor([op, *at, n, num_logits, int(from_buffer)], dtype=torch.int64)
        dist.broadcast(header, 0, group=self.control)
        if n and not from_buffer:
            dist.broadcast(tokens.to(torch.int64).contiguous(), 0)


def follow(parallel: Parallel, model, caches: list) -> None:
    """A follower's loop: run each pass rank 0 announces on this rank's slices, until it says STOP. caches: (KV cache,
    its decode step) of each of rank 0's caches, in the same order."""
    while True:
        header = torch.empty(HEADER, dtype=torch.int64)
        dist.broadcast(header, 0, group=parallel.control)
        op, index, start, n, num_logits, from_buffer = header.tolist()
        if op == STOP:
            return
        tokens = None
        if n and not from_buffer:
            tokens = torch.empty(n, dtype=torch.int64, device=parallel.device)
            dist.broadcast(tokens, 0)
        cache, decode = caches[index]
        cache.length = start  # rank 0's cache rolled back (or moved on) to here
        if op == FORWARD:
            model(tokens, cache, num_logits=num_logits)
        else:
            decode(decode.greedy_next if from_buffer else tokens)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join(rank: int, size: int, device: torch.device, address: str, announced: bool = True) -> Parallel:
    """Join the group of `size` ranks at address (tcp://host:port) as `rank`; announced: with the control group of
    rank 0's announcements (else every rank runs the same passes itself)."""
    if dist.is_initialized():  # torch.distributed holds one default group a process
        raise ParameterError("tp", "takes one engine a process: this process runs a tensor-parallel group already")
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group(_backend(device), init_method=address, rank=rank, world_size=size,
                            timeout=timedelta(minutes=30))
    return Parallel(rank, size, device, dist.new_group(backend="gloo") if announced else None)


def world_size(tp: int) -> int:
    """The ranks of the group: torchrun's world size when torchrun started this process, else `tp` (--tp)."""
    launched = torchrun_rank()
    return launched[1] if launched else tp


def launch(size: int, device: torch.device, target, args: tuple, announced: bool = True) -> Parallel | None:
    """This process's place in a group of `size` ranks (world_size), None for one rank. target(parallel, *args) is
    what every rank but 0 runs: under torchrun such a rank runs it here and exits; else this process is rank 0 and
    starts the others running it."""
    launched = torchrun_rank()
    if launched and launched[0] != 0:
        target(join(launched[0], size, device, "env://", announced), *args)
        sys.exit(0)
    if size == 1:
        return None
    if launched:
        parallel = join(0, size, device, "env://", announced)
        atexit.register(stop, parallel, [], threading.Event())  # torchrun's followers too wait for STOP
        return parallel
    return start(size, device, target, args, announced)


def start(size: int, device: torch.device, target, args: tuple, announced: bool) -> Parallel:
    """Rank 0: start ranks 1..size-1 as processes running target(parallel, *args) (see _worker) and join the group
    with them. A rank that fails takes the group down: the watchdog ends this process with one line."""
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ParameterError("tp", f"{size} needs {size} GPUs; {torch.cuda.device_count()} are here")
    address = f"tcp://127.0.0.1:{free_port()}"
    context = torch.multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(rank, size, device, address, announced, target, args),
                               daemon=True) for rank in range(1, size)]
    for w in workers:
        w.start()
    stopping = threading.Event()  # set once rank 0 tells them to stop: then their exits are expected

    def dead():  # a rank that failed; one that has done its part (bench) exits 0
        failed = (w for w in workers if w.exitcode not in (None, 0))
        return None if stopping.is_set() else next(((w.pid, w.exitcode) for w in failed), None)

    _watches.append(dead)
    watch(dead)
    parallel = join(0, size, device, address, announced)
    atexit.register(stop, parallel, workers, stopping)
    return parallel


def stop(parallel: Parallel, workers: list, stopping: threading.Event) -> None:
    """Rank 0, on its way out: the followers stop (STOP), or those it started are ended when they do not answer."""
    stopping.set()
    if all(w.is_alive() for w in workers):  # else the group is broken: a broadcast could wait for the dead
        try:
            parallel.announce(STOP)
        except Exception:  # the group broke meanwhile: end the followers below
            pass
    for w in workers:
        w.join(timeout=5)
        if w.is_alive():
            w.terminate()


def watch(dead) -> None:
    """A daemon thread that ends this process, saying so on one line, once dead() names a rank that has gone:
    (pid, exit code) or None."""

    def run():
        while True:
            gone = dead()
            if gone is not None and _reporting.acquire(blocking=False):
                print(f"infer: error: {_gone_message(*gone)}", file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(WATCH_SECONDS)

    threading.Thread(target=run, daemon=True, name="infer-tp-watch").start()


def _gone_message(pid, code) -> str:
    return f"a tensor-parallel rank (pid {pid}) exited with code {code}; stopping"


def lost_rank() -> str | None:
    """Rank 0, after an error: when a follower has gone (a collective with it fails before the watchdog sees the
    exit, so look for a few watch periods), the line that says so, and the watchdog stays quiet; else None."""
    if not _watches:
        return None
    deadline = time.monotonic() + 4 * WATCH_SECONDS
    while time.monotonic() < deadline:
        gone = next((g for g in (dead() for dead in _watches) if g is not None), None)
        if gone is not None and _reporting.acquire(blocking=False):
            return _gone_message(*gone)
        time.sleep(WATCH_SECONDS / 5)
    return None


def _worker(rank: int, size: int, device: torch.device, address: str, announced: bool, target, args: tuple) -> None:
    """A rank that rank 0 started (start): it ignores Ctrl-C (the terminal's SIGINT reaches the whole process group:
    rank 0 decides what it means), exits when rank 0 is gone, and says a failure on one line, its exit code telling
    rank 0's watchdog."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    watch(lambda: None if os.getppid() == parent else (parent, "?"))
    try:
        target(join(rank, size, device, address, announced), *args)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]  # an exception may carry no message
        print(f"infer: error: tensor-parallel rank {rank}: {type(e).__name__}: {first_line}", file=sys.stderr,
              flush=True)
        os._exit(1)


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when torchrun started this process, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def check_split(size: int, cfg) -> None:
    """That `size` ranks can split a model of ModelConfig cfg: its KV heads (with their query heads), intermediate
    features and vocabulary evenly."""
    if size < 1:
        raise ParameterError("tp", f"must be at least 1, got {size}")
    if size > 1 and not dist.is_available():
        raise InferError("this torch has no torch.distributed: tensor parallelism is not available")
    for n, what in ((cfg.num_kv_heads, "key-value heads"), (cfg.intermediate_size, "intermediate size"),
                    (cfg.vocab_size, "vocabulary")):
        if n % size:
            raise ParameterError("tp", f"must divide the model's {what} ({n}), got {size}")


def share_int(parallel: Parallel, value: int | None = None) -> int:
    """Rank 0's `value`, on every rank (the control group)."""
    t = torch.tensor([value if parallel.rank == 0 else 0], dtype=torch.int64)
    dist.broadcast(t, 0, group=parallel.control)
    return int(t)
