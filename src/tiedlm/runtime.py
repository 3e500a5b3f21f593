"""The process and the machine it runs on: the device, the allocator, and what a run records of them.

:func:`provenance` is the one record of where a result came from (command, commit, torch
version, hardware, threads, CPU features); run.json, the analyses' reports and the benchmarks
all take it from there.

Allocator tuning, for CPU training speed:

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
import gc
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def frozen_heap():
    """Keep every object alive on entry out of the cyclic garbage collector's scans until exit (gc.freeze).

    A training step of the exact recurrence makes thousands of short-lived Python objects (per-step
    views and tuples), so the collector runs many times per window, and its older generations rescan
    everything made before: torch's own objects (hundreds of thousands), the vocabulary, the model (the fused kernels of
    the naive reference make few objects). benchmarks/AVX2.md is measured with it. What is frozen
    is the set-up, alive for the whole run anyway; on exit it goes back to the collector's oldest
    generation.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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


def resolve_device(name: str):
    """``train.device`` as a torch.device: auto → cuda where available, else cpu."""
    import torch

    from tiedlm.errors import TiedlmError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TiedlmError(f"train.device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TiedlmError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def provenance(device, command: list[str] | str | None = None) -> dict[str, Any]:
    """Where a result comes from: the command (default ``sys.argv``), the commit of the source, the
    torch version, the hardware in words, the thread count and, on a CPU, the features that decide
    its precision and kernels (:func:`tiedlm.precision.cpu_features`)."""
    import torch

    from tiedlm.precision import cpu_features

    record: dict[str, Any] = {
        "command": list(sys.argv) if command is None else command,
        "commit": git_commit(),
        "torch": torch.__version__,
        "hardware": hardware(device),
        "threads": torch.get_num_threads(),
    }
    if getattr(device, "type", str(device)) == "cpu":
        record["cpu_features"] = cpu_features().describe()
    return record


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
