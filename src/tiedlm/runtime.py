"""Process-level settings that make CPU training fast.

PyTorch's CPU allocator hands large tensors to glibc's malloc, which serves
every block above 32 MiB (dynamically lowered to the last freed size, so in
practice the (tokens × |V|) logits of every step) with a fresh mmap. Each
step then page-faults its way through tens of MB of new zero pages; measured
on PTB small REAL (bf16, 2 cores) this costs about 40% of the training
throughput. Serving them from the heap and keeping freed memory lets every
step reuse the same pages. The `tiedlm` command does this at start-up;
library users can call :func:`tune_allocator` themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
import subprocess
import sys
from pathlib import Path

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Make glibc keep and reuse large blocks (no mmap, no trimming). True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for run records."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device) -> str:
    """What a run ran on, in words: the GPU model, or the CPU model and thread count."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {threads} thread{'s' if threads != 1 else ''}"


def git_commit() -> str | None:
    """The commit of the tiedlm source in use (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def available_memory() -> int | None:
    """Bytes this process can still allocate: the least of the free RAM (MemAvailable), the
    cgroup's memory limit and the address-space limit (ulimit -v); None where none is known."""
    import resource

    limits = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            limits.append(max(0, int(text) - used))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits) if limits else None
