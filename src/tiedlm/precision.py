"""Numeric precision of the matrix products: fp32, or bf16 autocast (CPU and CUDA).

Under bf16 autocast the matrix products (embedding-side projections, LSTM,
decoder) run in bfloat16, while the softmaxes, the cross-entropy and the
augmented loss run in fp32 (they cast their inputs), and sums are accumulated
in fp32/fp64 by the trainer.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device | str, precision: str):
    """The autocast context for ``precision`` on ``device``."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
