"""Kept for ``from tiedlm.static_loss import STATIC_CHUNK_ELEMENTS`` (tiedlm/train.py): the module is
``tiedlm.loss.static`` now."""

from tiedlm.loss.static import STATIC_CHUNK_ELEMENTS, static_components

__all__ = ["STATIC_CHUNK_ELEMENTS", "static_components"]
