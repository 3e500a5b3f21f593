"""Variational (locked) dropout masks for the VD-LSTM (Gal & Ghahramani 2016; docs/method.md §4).

A mask is drawn once per window and reused at every time step. ``exact`` mode
draws one mask per sequence (shape (B, F)); ``fast`` mode draws one mask for
the whole batch (shape (1, F)), which on the recurrent state is the same as
dropping columns of W_hh, so the fused LSTM kernel can run unchanged.

    time →   t=0   t=1   t=2  ...          every step of sequence b reuses
    seq b   [m_b] [m_b] [m_b] ...          the same row m_b of the mask

Masks are scaled by 1/(1-p) (inverted dropout), so evaluation needs no change.
"""

from __future__ import annotations

import torch


def variational_mask(
    rows: int, features: int, p: float, *, generator: torch.Generator | None, device, dtype=torch.float32
) -> torch.Tensor:
    """A (rows, features) mask of 0 and 1/(1-p); ``rows`` is B (exact) or 1 (fast)."""
    keep = torch.empty(rows, features, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=generator)
    return keep.div_(1.0 - p)
