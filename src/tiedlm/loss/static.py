"""The augmented loss with static shapes: the target side over every token, for CUDA-graph capture.

``tiedlm.loss.eager`` computes ỹ = softmax(L·L[y*]/τ) once per *unique* target of the batch. That
needs ``torch.unique``: its output shape depends on the data and it waits for the device, and
a CUDA graph can capture neither. Here every token t gets its own row ỹ_t = softmax(L[y_t]·Lᵀ/τ).
The mathematics is the same (a row of ỹ depends only on the target id, so the rows of tokens
that share a target are equal) and so is every other step of the loss (docs/method.md §3):

    KL_t = Σ_j ỹ_tj (log ỹ_tj − log ŷ_tj)            log ŷ_t = z_t/τ − lse(z_t/τ)
    ∂KL_t/∂z_t = (ŷ_t − ỹ_t)/τ
    ∂KL_t/∂s_t = ỹ_t ⊙ (log ỹ_t − log ŷ_t − KL_t)     for the scores s_t = L[y_t]·Lᵀ/τ (trainable target)

The cost is N rows of the target side's products instead of U (about 1.8× more of them at 55%
unique targets), cheap on a GPU. Every shape is fixed by (N, |V|); tokens are processed in
fixed blocks of at most ``chunk_rows`` rows, each a slice (no gathering), and nothing reads a
value back to the host. The τ-softmaxes run in fp32 with autocast off and the target side's
products take the logits' dtype, exactly as in ``tiedlm.loss.eager``, whose helpers this reuses.
"""

from __future__ import annotations

import torch

from tiedlm.loss import eager

# One block of (tokens × |V|) for a whole WikiText-2 window (700 × 33,278) with room to spare:
# 256 MiB per fp32 array. The captured training step uses this; the default stays in tiedlm.loss.eager.
STATIC_CHUNK_ELEMENTS = 1 << 26


def _spans(tokens: int, chunk_rows: int) -> list[slice]:
    """Fixed token blocks covering 0..tokens-1 in order; one ``slice(None)`` when they fit one block."""
    if tokens <= chunk_rows:
        return [slice(None)]
    return [slice(start, min(start + chunk_rows, tokens)) for start in range(0, tokens, chunk_rows)]


def _block(logits, emb, targets, *, tau: float):
    """(log ỹ, ỹ, z/τ, ŷ, lse(z/τ)) of one block of tokens, each row (n, V) per token."""
    log_q = eager.target_log_probs(emb, targets, tau=tau, product=logits.dtype)  # (n, V): one row per token
    scaled = eager.scaled_logits(logits, tau, emb.dtype)
    p_hat, lse = eager.softmax_and_lse(scaled, emb.dtype)
    return log_q, log_q.exp(), scaled, p_hat, lse


def kl_forward(logits, emb, targets, *, tau: float, chunk_rows: int):
    """Per-token KL(ỹ ‖ ŷ); returns (kl, kept): kept is the block of a batch that fits one."""
    kl = emb.new_empty(logits.size(0))
    kept = None
    for span in _spans(logits.size(0), chunk_rows):
        log_q, q, scaled, p_hat, lse = block = _block(logits[span], emb, targets[span], tau=tau)
        kl[span] = torch.linalg.vecdot(q, log_q) - torch.linalg.vecdot(q, scaled) + lse  # Σ ỹ = 1
        if span == slice(None):
            kept = block
        del block, log_q, q, scaled, p_hat, lse
    return kl, kept


def kl_backward(
    logits, emb, targets, kl, g, *, tau: float, chunk_rows: int, kept, grad_z, want_z: bool, train_target: bool
):
    """Gradients of Σ g·KL: (ŷ − ỹ)/τ·g added into ``grad_z`` (a new tensor when None) and, when
    ``train_target``, the gradient into L through ỹ. Returns (grad_z, grad_emb)."""
    grad_emb = torch.zeros_like(emb) if train_target else None
    if want_z and grad_z is None:
        grad_z = torch.zeros_like(logits, dtype=g.dtype)
    for span in _spans(logits.size(0), chunk_rows):
        block = kept if kept is not None else _block(logits[span], emb, targets[span], tau=tau)
        log_q, q, scaled, p_hat, lse = block
        weights = g[span]
        if want_z:
            scale = (weights / tau).unsqueeze(1)
            grad_z[span].addcmul_(p_hat, scale).addcmul_(q, scale, value=-1.0)
        if grad_emb is not None:
            # ỹ ⊙ (log ỹ − log ŷ − KL) · g per token, with log ŷ = z/τ − lse
            d_scores = (log_q - scaled).add_((lse - kl[span]).unsqueeze(1)).mul_(q).mul_(weights.unsqueeze(1))
            rows = targets[span]
            grad_emb.index_add_(0, rows, eager.matmul_in(d_scores, emb, logits.dtype) / tau)  # into L[y_t]
            grad_emb += eager.matmul_in(d_scores.t(), emb[rows], logits.dtype) / tau  # into every L[j]
            del d_scores
        del block, log_q, q, scaled, p_hat, lse
    return grad_z, grad_emb


# Cross-entropy and KL with the target side over every token: the eager function's passes swapped.
StaticCrossEntropyAndKL = eager.cross_entropy_and_kl_function(kl_forward, kl_backward)


def static_components(
    logits: torch.Tensor,
    targets: torch.Tensor,
    embedding: torch.Tensor,
    tau: float,
    *,
    bias: torch.Tensor | None = None,
    detach_target: bool = False,
    max_chunk_elements: int = STATIC_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of z + b, KL(ỹ ‖ ŷ)) per token, each (N,) in fp32, with static shapes.

    The same values and gradients as ``AugmentedLoss.components`` (to rounding); see the module
    docstring. logits: (N, |V|) bias-free W·h; targets: (N,) int64; embedding: L, (|V|, d).
    """
    eager.check_shapes(logits, targets, embedding)
    chunk_rows = max(1, max_chunk_elements // logits.size(1))
    ce, kl = StaticCrossEntropyAndKL.apply(logits, bias, embedding, targets, float(tau), chunk_rows, not detach_target)
    return ce.float(), kl.float()
