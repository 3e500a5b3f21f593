"""The decoder and the cross-entropy in one autograd node: −log softmax(W·h + b)[y] per token.

Written as two nodes (the decoder, then the loss), the backward pass scales softmax − onehot(y)
by the incoming per-token gradient into a second (tokens × |V|) array before the decoder's
products read it. In training that gradient is one number for every token (the objective is a
sum over tokens divided by the batch size: autograd hands the loss an expanded scalar), so here
the scale is applied to small arrays instead: to ∂h (tokens × d), to the hidden states that ∂W
is formed from (tokens × d), and to ∂b; the products read softmax(W·h + b), kept from the
forward pass, as it is. One |V|-wide pass and array fewer per window.

Only on a CPU, for fp32 (or fp64) products without autocast; :func:`linear_cross_entropy` falls
back to the two nodes otherwise (bf16 products round the logits, which that path handles).
"""

from __future__ import annotations

import torch
from torch import nn

from tiedlm.layouts import weight_grad
from tiedlm.loss.eager import cross_entropy, softmax_and_cross_entropy


class _LinearCrossEntropy(torch.autograd.Function):
    """∂/∂z of the loss is g ⊙ (p − onehot(y)) per token (p = softmax(z), g the incoming gradient).
    The onehot part only touches one entry per token, so it is applied to the products' results
    (a row of W per token into ∂h, a row of h into ∂W's row y, g into ∂b[y]) and p stays as it is."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
        p, ce = softmax_and_cross_entropy(logits, targets, logits.dtype)
        ctx.save_for_backward(hidden, weight, p, targets)
        ctx.has_bias = bias is not None
        return ce

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, p, targets = ctx.saved_tensors
        scale = grad[0] if grad.stride(0) == 0 else None  # an expanded scalar: scale small arrays, not p
        weighted = p if scale is not None else p * grad.unsqueeze(1)
        minus_g = -grad.unsqueeze(1)  # (N, 1)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = weighted @ weight
            if scale is not None:
                grad_hidden.mul_(scale)
            grad_hidden.addcmul_(minus_g, weight[targets])
        if ctx.needs_input_grad[1]:
            inputs = hidden if scale is None else hidden * scale
            grad_weight = weight_grad(weighted, inputs)
            grad_weight.index_add_(0, targets, hidden * minus_g)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = weighted.sum(0)
            if scale is not None:
                grad_bias.mul_(scale)
            grad_bias.index_add_(0, targets, minus_g.squeeze(1))
        return grad_hidden, grad_weight, grad_bias, None


def fuses(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear_cross_entropy` runs as one node here: on a CPU (index_add_ is deterministic
    there), with fp32 (or fp64) products and no autocast."""
    return (
        hidden.device.type == "cpu"
        and hidden.dtype == weight.dtype
        and hidden.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled(hidden.device.type)
    )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Per-token −log softmax(hidden·weightᵀ + bias)[targets], shape (N,), for hidden (N, d).

    The same numbers as ``cross_entropy(F.linear(hidden, weight, bias), targets)``; one node
    where :func:`fuses` says so and gradients are wanted, else exactly that.
    """
    if torch.is_grad_enabled() and fuses(hidden, weight) and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets)
    return cross_entropy(nn.functional.linear(hidden, weight, bias), targets)
