"""Pieces every architecture shares: the (tied) output layer and the uniform initialisation."""

from __future__ import annotations

from torch import nn


def output_layer(embedding: nn.Embedding, tie: bool, bias: bool) -> nn.Linear:
    """The decoder: with ``tie`` its weight *is* the embedding matrix L; ``bias`` from
    ``ModelConfig.has_output_bias`` (a bias only when untied, unless the config says otherwise; docs/method.md §2)."""
    vocab_size, size = embedding.weight.shape
    decoder = nn.Linear(size, vocab_size, bias=bias)
    if tie:
        decoder.weight = embedding.weight
    return decoder


def init_uniform(module: nn.Module, init_range: float) -> None:
    """Every parameter of ``module`` drawn from U(−init_range, init_range), in registration order."""
    for parameter in module.parameters():
        nn.init.uniform_(parameter, -init_range, init_range)
