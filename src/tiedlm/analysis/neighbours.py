"""Cosine neighbours of a word in a model's (tied) embedding."""

from __future__ import annotations

import math

import torch

from tiedlm.data import Vocabulary
from tiedlm.errors import TiedlmError


def nearest_words(embedding: torch.Tensor, vocab: Vocabulary, word: str, k: int = 10) -> list[tuple[str, float]]:
    """The k words whose embedding rows have the highest cosine similarity with ``word``'s (itself excluded)."""
    if word not in vocab.stoi:
        raise TiedlmError(f"{word!r} is not in the vocabulary ({len(vocab)} words)")
    if k < 1:
        raise TiedlmError(f"-k must be ≥ 1, got {k}")
    unit = torch.nn.functional.normalize(embedding.detach().float(), dim=1)
    index = vocab.stoi[word]
    similarity = unit @ unit[index]
    similarity[index] = -math.inf
    values, indices = similarity.topk(min(k, len(vocab) - 1))
    return [(vocab.itos[i], v) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]
