"""Numeric precision of the matrix products: fp32, bf16 autocast, or ``auto``; and what the machine can do.

Under bf16 autocast the matrix products (embedding-side projections, LSTM,
decoder) run in bfloat16, while the softmaxes, the cross-entropy and the
augmented loss run in fp32 (they cast their inputs), and sums are accumulated
in fp32/fp64 by the trainer.

bf16 is *native* on a CPU with AVX512_BF16 or AMX (Zen 4 and later, Intel
Cooper Lake / Sapphire Rapids and later) and on a CUDA GPU that supports it.
Elsewhere PyTorch emulates bf16 products, about 50 times slower than fp32
(measured on an AVX2-only Zen 3), and oneDNN's fused bf16 LSTM does not run at
all; ``auto`` therefore picks bf16 only where it is native.

The probe honours two caps, so that a bf16-native machine can run the AVX2
paths (CI does): oneDNN's own ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX2``), and
``TIEDLM_CPU_ISA=avx2``, which tells tiedlm alone to treat the CPU as AVX2-only.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "auto")

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which bf16 dot products are still native.
_NATIVE_ONEDNN_CAPS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "DEFAULT", "ALL")


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's vector features that matter for bf16, as this process may use them."""

    capability: str  # ATen's kernel level: DEFAULT, AVX2, AVX512
    avx512_bf16: bool
    amx: bool
    cap: str | None  # the environment cap that applies, e.g. "ONEDNN_MAX_CPU_ISA=AVX2"

    @property
    def bf16_native(self) -> bool:
        return self.avx512_bf16 or self.amx

    def describe(self) -> str:
        """E.g. ``AVX512, avx512_bf16`` or ``AVX2, no avx512_bf16/amx (bf16 emulated)``."""
        native = [name for name, has in (("avx512_bf16", self.avx512_bf16), ("amx", self.amx)) if has]
        text = f"{self.capability}, {'+'.join(native)}" if native else f"{self.capability}, no avx512_bf16/amx"
        if not native:
            text += " (bf16 emulated)"
        return text + (f"; capped by {self.cap}" if self.cap else "")


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """What the CPU offers, after the caps in the environment (see the module docstring)."""
    capability = torch.backends.cpu.get_cpu_capability()
    avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    cap = None
    own = os.environ.get("TIEDLM_CPU_ISA", "").strip().lower()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if own and own != "native":
        cap = f"TIEDLM_CPU_ISA={own}"
        avx512_bf16 = amx = False
        if own == "avx2" and capability.startswith("AVX512"):
            capability = "AVX2"
    elif onednn and not onednn.startswith(_NATIVE_ONEDNN_CAPS):
        cap = f"ONEDNN_MAX_CPU_ISA={onednn}"
        avx512_bf16 = amx = False
    return CpuFeatures(capability, avx512_bf16, amx, cap)


def bf16_native(device: torch.device | str) -> tuple[bool, str]:
    """Whether bf16 products are native on ``device``, and why (in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} supports bf16"
        return False, f"{torch.cuda.get_device_name(device)} has no native bf16"
    features = cpu_features()
    if features.bf16_native:
        return True, f"the CPU has {features.describe()}"
    return False, f"the CPU has {features.describe()}"


def resolve_precision(requested: str, device: torch.device | str) -> tuple[str, str]:
    """The precision to run (fp32 or bf16) for the config value ``requested``, and why."""
    if requested != "auto":
        return requested, "set in the config"
    native, why = bf16_native(device)
    return ("bf16", f"auto: {why}") if native else ("fp32", f"auto: {why}")


def emulated_bf16_slowdown() -> float:
    """How many times slower a bf16 product is than fp32 here: the best of a few 256² products each, on one thread."""
    size, best = 256, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy machine's oversubscribed threads would blur the comparison
    try:
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(size, size).to(dtype)
            b = torch.randn(size, size).to(dtype)
            times = []
            for _ in range(10):
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            best[dtype] = min(times)
    finally:
        torch.set_num_threads(threads)
    return best[torch.bfloat16] / best[torch.float32]


_warned: set[str] = set()


def warn_if_emulated(precision: str, device: torch.device | str, setting: str = "train.precision") -> None:
    """Say once per process, on one line, that bf16 is emulated on this machine, with the measured cost."""
    if precision != "bf16" or setting in _warned:
        return
    native, why = bf16_native(device)
    if native:
        return
    _warned.add(setting)
    slowdown = f", {emulated_bf16_slowdown():.0f}x slower than fp32 here" if torch.device(device).type == "cpu" else ""
    print(
        f"tiedlm: warning: {setting} = bf16 but {why}: bf16 products are emulated{slowdown} (use fp32 or auto)",
        file=sys.stderr,
    )


@functools.cache
def fused_lstm_bf16_ok(device_type: str) -> bool:
    """Whether the fused LSTM kernel (oneDNN on a CPU, cuDNN on a GPU) runs under bf16 autocast.

    oneDNN has no bf16 LSTM primitive without AVX512_BF16/AMX (nor under an ISA cap below
    them); it raises rather than falling back. Tried once on a tiny input.
    """
    if device_type != "cpu":
        return True
    if not cpu_features().bf16_native:  # TIEDLM_CPU_ISA caps tiedlm's choice even where oneDNN could run
        return False
    lstm = torch.nn.LSTM(4, 4)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(2, 1, 4))
    except RuntimeError:
        return False
    return True


def autocast(device: torch.device | str, precision: str):
    """The autocast context for ``precision`` (fp32 or bf16, already resolved) on ``device``."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def fused_lstm(lstm: torch.nn.LSTM, x: torch.Tensor, hx, call=None):
    """``lstm(x, hx)`` (or ``call(x, hx)``), in fp32 where the fused kernel has no bf16 path here.

    Only this layer leaves autocast; the products around it (the decoder) stay bf16.
    """
    call = call or lstm
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not fused_lstm_bf16_ok("cpu"):
        with torch.autocast("cpu", enabled=False):
            return call(x.float(), tuple(part.float() for part in hx))
    return call(x, hx)
