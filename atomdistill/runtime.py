"""Where and how the work runs: the device, and process-level settings for speed on CPU.

resolve_device turns "auto", "cpu", "cuda", "cuda:1" into a torch.device, or a clear error.

glibc serves allocations above 32 MB (one activation tensor of a 64-image chunk at 32x32) with
fresh mmap'd pages and returns them on free, so every such tensor pays page faults again: an
elementwise op on it ran 5-8x slower than on reused memory (torch 2.14, 2 cores). Keeping freed
memory in the heap removes that cost; PyTorch's CPU tuning guide reaches the same end by
preloading jemalloc or tcmalloc. The command line calls this once at start; library users may
call it themselves. Set ATOMDISTILL_KEEP_MALLOC=1 to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from .errors import ConfigError

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse (no mmap per large tensor). True if applied."""
    if os.environ.get("ATOMDISTILL_KEEP_MALLOC") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (e.g. musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
                and mallopt(_M_TOP_PAD, 64 << 20))


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto": a CUDA GPU when one is visible, else the CPU; otherwise the device named."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return device
