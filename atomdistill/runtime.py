"""Where and how the work runs: the device, and process-level settings for speed on CPU.

resolve_device turns "auto", "cpu", "cuda", "cuda:1" into a torch.device, or a clear error.

glibc serves allocations above 32 MB (one activation tensor of a 64-image chunk at 32x32) with
fresh mmap'd pages and returns them on free, so every such tensor pays page faults again: an
elementwise op on it ran 5-8x slower than on reused memory (torch 2.14, 2 cores). Keeping freed
memory in the heap removes that cost; PyTorch's CPU tuning guide reaches the same end by
preloading jemalloc or tcmalloc. The command line calls this once at start; library users may
call it themselves. Set ATOMDISTILL_KEEP_MALLOC=1 to leave the allocator alone.

Also the precision option: bf16 autocast for the forward passes, where asked for.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
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


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch's failure to allocate memory (CUDA's OutOfMemoryError, or the CPU
    allocator's RuntimeError, which has no class of its own)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def out_of_memory_message(error: BaseException) -> str:
    """What torch asked for, in words: "tried to allocate 2.5 GiB" (the CPU allocator gives bytes)."""
    text = str(error)
    if m := re.search(r"tried to allocate (\d+) bytes", text):
        return f"tried to allocate {int(m.group(1)) / 2**30:.1f} GiB"
    if m := re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", text):
        return m.group(0).lower()
    return text.strip().splitlines()[0][:120]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto": a CUDA GPU when one is visible, else the CPU; otherwise the device named."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"--device {device} was asked for but {count} CUDA GPU{'s are' if count > 1 else ' is'} "
                          f"visible (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); use one of those or auto")
    return device


# ---- lower precision (an option, never the default) -----------------------------------------
PRECISIONS = ("fp32", "bf16")
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")   # instructions that compute bf16 natively on x86
_warned: set[str] = set()


def check_precision(precision: str, device=None) -> str:
    """Validate `precision`; for bf16 on a `device` that is a CPU without native bf16 instructions
    print one warning line (it works, emulated, and runs slower than fp32). Returns `precision`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision == "bf16" and device is not None and torch.device(device).type == "cpu" and "bf16-cpu" not in _warned:
        flags = cpu_flags()
        if flags is not None and not any(f in flags for f in _BF16_CPU_FLAGS):
            _warned.add("bf16-cpu")
            print(f"atomdistill: warning: precision bf16 on a CPU without {' or '.join(_BF16_CPU_FLAGS)}: "
                  "bf16 is emulated there and runs far slower than fp32 (a ConvNet forward: ~60x on an AVX2 CPU)",
                  file=sys.stderr)
    return precision


def compiled(fn, device):
    """torch.compile(fn), checked first for what inductor needs on a CPU: a C++ compiler."""
    import shutil
    if torch.device(device).type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"),
                                                                                 "g++", "c++", "clang++")):
        raise ConfigError("--compile needs a C++ compiler for torch.compile on a CPU and none was found "
                          "(g++, c++ or clang++, or $CXX); install one (e.g. apt install g++) or run without --compile")
    return torch.compile(fn, dynamic=False)


def cpu_flags() -> set[str] | None:
    """The CPU's instruction-set flags from /proc/cpuinfo (None where that cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def autocast(device, precision: str):
    """The context the forward passes run in: bf16 autocast for 'bf16', nothing for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(getattr(device, "type", str(device)).split(":")[0], dtype=torch.bfloat16)
