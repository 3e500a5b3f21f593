"""Pieces every architecture shares: the (tied) output layer, its product, and the uniform initialisation."""

from __future__ import annotations

import torch
from torch import nn

from tiedlm.layouts import weight_grad


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


class _Linear(torch.autograd.Function):
    """x·Wᵀ + b for x (N, in) whose backward forms W's gradient with :func:`weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = weight_grad(grad, x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on a CPU in fp32 (no autocast) with W's gradient as in :func:`weight_grad`."""
    if (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and torch.is_grad_enabled()
        and weight.requires_grad
        and not torch.is_autocast_enabled("cpu")
    ):
        out = _Linear.apply(x.reshape(-1, x.size(-1)), weight, bias)
        return out.view(*x.shape[:-1], out.size(-1))
    return nn.functional.linear(x, weight, bias)
