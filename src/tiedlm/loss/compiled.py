"""The augmented loss with its (tokens × |V|) work fused by ``torch.compile`` (``train.compile = true``).

The eager loss (``tiedlm.loss.eager``) makes about twenty element-wise passes over
(tokens × |V|) arrays per step: softmaxes, their maxima, the KL's row sums, the
gradient's terms, dtype conversions. Here the token side of cross-entropy + KL
is two compiled functions that read the logits once each:

    forward:  per token lse(z), lse(z/τ), z_y and ỹ·z  →  CE, Σ ỹ log ŷ
    backward: (softmax(z) − onehot(y))·g_ce + (softmax(z/τ) − ỹ)·g_kl/τ, in the logits' dtype

recomputing the softmaxes rather than storing them. ỹ (one row per unique
target, read by index) and the gradient into L stay as in the eager loss.
Only a tied (bias-free) model whose batch fits one loss block takes this path;
everything else falls back to the eager loss. Same mathematics: the tests hold
it to the eager loss.
"""

from __future__ import annotations

import functools

import torch
from torch._dynamo.exc import TorchDynamoException
from torch._inductor.exc import InductorError

from tiedlm.errors import TiedlmError
from tiedlm.loss import eager


def _token_forward(z, q, row, targets, tau: float):
    zf = z.float()
    top = zf.amax(-1, keepdim=True)
    lse = top.squeeze(1) + torch.log(torch.exp(zf - top).sum(-1))
    lse_tau = top.squeeze(1) / tau + torch.log(torch.exp((zf - top) / tau).sum(-1))
    ce = lse - zf.gather(1, targets[:, None]).squeeze(1)
    cross = (q[row] * zf).sum(-1) / tau - lse_tau  # Σ ỹ log ŷ (Σ ỹ = 1)
    return ce, cross, lse, lse_tau


def _token_backward(z, q, row, targets, lse, lse_tau, grad_ce, grad_kl, tau: float):
    zf = z.float()
    onehot = torch.arange(zf.size(1), device=z.device)[None, :] == targets[:, None]
    grad = (torch.exp(zf - lse[:, None]) - onehot.float()) * grad_ce[:, None]
    grad = grad + (torch.exp(zf / tau - lse_tau[:, None]) - q[row]) * (grad_kl / tau)[:, None]
    return grad.to(z.dtype)


@functools.cache
def _compiled():
    return _guarded(torch.compile(_token_forward)), _guarded(torch.compile(_token_backward))


def _guarded(compiled):
    """Turn a failure to build the kernels (no C++ compiler, no Triton, ...) into a one-line error."""

    def run(*args):
        try:
            return compiled(*args)
        except (TorchDynamoException, InductorError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TiedlmError(
                f"train.compile: torch.compile could not build the fused loss kernels ({reason[:200]}); "
                "set train.compile = false"
            ) from None

    return run


class _FusedCrossEntropyAndKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, embedding, targets, tau, train_target):
        forward, _ = _compiled()
        with torch.autocast(logits.device.type, enabled=False):
            emb = embedding.float()
            target_ids, row = torch.unique(targets, return_inverse=True)
            log_q = eager.target_log_probs(emb, target_ids, tau=tau, product=logits.dtype)  # (U, V)
            q = log_q.exp()
            ce, cross, lse, lse_tau = forward(logits, q, row, targets, tau)
            kl = torch.linalg.vecdot(q, log_q)[row] - cross
        ctx.save_for_backward(logits, embedding, targets, kl, lse, lse_tau)
        ctx.block = (target_ids, row, log_q, q)
        ctx.tau, ctx.train_target = tau, train_target
        return ce, kl

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        _, backward = _compiled()
        logits, embedding, targets, kl, lse, lse_tau = ctx.saved_tensors
        (target_ids, row, log_q, q), ctx.block = ctx.block, None
        tau = ctx.tau
        grad_ce = torch.zeros_like(kl) if grad_ce is None else grad_ce.float()
        grad_kl = torch.zeros_like(kl) if grad_kl is None else grad_kl.float()
        grad_logits = grad_embedding = None
        with torch.autocast(logits.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_logits = backward(logits, q, row, targets, lse, lse_tau, grad_ce, grad_kl, tau)
            if ctx.train_target and ctx.needs_input_grad[1]:
                emb = embedding.float()
                # The eager pass into L from a whole block; ŷ and the rows of ỹ are not needed there.
                block = eager.Block(
                    target_ids=target_ids, tokens=slice(None), row=row, p_hat=None,
                    scaled=eager.scaled_logits(logits, tau, emb.dtype), lse=lse_tau, q_rows=None, log_q=log_q, q=q,
                )  # fmt: skip
                _, grad_emb = eager.kl_backward(
                    logits,
                    emb,
                    targets,
                    kl,
                    grad_kl,
                    tau=tau,
                    chunk_rows=None,
                    kept=block,
                    grad_z=None,
                    want_z=False,
                    train_target=True,
                )
                grad_embedding = grad_emb.to(embedding.dtype)
        return grad_logits, grad_embedding, None, None, None


def fused_components(
    logits: torch.Tensor, targets: torch.Tensor, embedding: torch.Tensor, tau: float, *, detach_target: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, KL) per token through the compiled kernels; see the module docstring."""
    ce, kl = _FusedCrossEntropyAndKL.apply(logits, embedding, targets, float(tau), not detach_target)
    return ce, kl
