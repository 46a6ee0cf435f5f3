"""Programmatic dependent launch (PDL; Hopper and later GPUs) for the kernels of a decode step.

A kernel launched with `launch_pdl=True` may start while the kernel before it in the stream is still running.
Each such kernel calls `enter` before it reads or writes anything another kernel touches: `gdc_wait` returns once
the kernels before it have finished and their writes are visible, then `gdc_launch_dependents` lets the next
kernel launch as soon as every program of this one has started. So a kernel's launch, and whatever it loads before
`enter` (what no kernel writes: the GEMV's first weight tile, the RMSNorm weight, RoPE's frequencies), overlap the
tail of the kernel before it.
Without PDL (CPU interpreter, older GPUs) `enter` compiles to nothing.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: CUDA devices of compute capability 9.0 and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def launch(device: torch.device) -> dict:
    """Keyword arguments of a kernel launch on `device`: the kernel's PDL constexpr and Triton's launch_pdl."""
    on = enabled(device)
    return dict(PDL=on, launch_pdl=on)


@triton.jit
def enter(PDL: tl.constexpr):
    """Wait for the kernels before this one, then let the next one launch (both only when launched with PDL)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
