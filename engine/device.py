"""Device and dtype choices shared by the engine and the benchmarks."""

import torch

from .errors import InferError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    """The dtype called `name`; by default bfloat16 on CUDA and float32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise InferError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


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
