"""Device and dtype choices shared by the engine and the benchmarks, and the memory a device has free."""

import os

import torch

from .errors import ParameterError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_device(name: str | None) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` (default: cuda when a GPU is there); anything else, or a GPU that is not there, is
    a ParameterError("device")."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ParameterError("device", f"must be cpu, cuda or cuda:N, got {name!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError("device", f"{name} was asked for, but no CUDA GPU is available")
        if index and int(index) >= torch.cuda.device_count():
            raise ParameterError("device", f"{name} was asked for, but only {torch.cuda.device_count()} GPU(s) are there")
    return torch.device(name)


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype called `name`; by default bfloat16 on CUDA and float32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ParameterError("dtype", f"must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def free_memory(device: torch.device) -> int:
    """Bytes that new tensors on `device` can take now: the GPU's free memory, or the CPU's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PendingInt:
    """The value of a device tensor [1] as it will be once the work queued so far has run: the copy to the host is
    queued now, and `get` waits for it alone, not for the work queued after it."""

    def __init__(self, value: torch.Tensor):
        self.host = value.to("cpu", non_blocking=True)  # pinned when it comes from CUDA
        self.event = None
        if value.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def get(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.host)
