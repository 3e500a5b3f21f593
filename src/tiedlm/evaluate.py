"""Perplexity: validation and test go through the same function."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tiedlm.data import batchify, bptt_windows, detach_state
from tiedlm.loss import cross_entropy
from tiedlm.precision import autocast


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy); inf for a diverged model rather than an overflow."""
    return math.exp(loss) if loss < 700 else math.inf


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy per predicted token, in nats
    tokens: int  # tokens predicted

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    ids: torch.Tensor,
    batch_size: int,
    bptt: int,
    precision: str = "fp32",
    *,
    where: str = "token stream",
    option: str = "batch size",
) -> Evaluation:
    """Perplexity of ``model`` on the token stream ``ids`` (carried state, no dropout).

    The stream is batchified like training data, so the last ``len % batch_size``
    tokens are not scored; with batch size 1 every token but the first is.
    ``where`` and ``option`` name the split and the batch-size setting in errors.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    source = batchify(ids, batch_size, where, option).to(device)
    state = model.init_state(batch_size)
    total, count = 0.0, 0
    for inputs, targets in bptt_windows(source, bptt):
        with autocast(device, precision):
            logits, state = model(inputs, state)
        state = detach_state(state)
        total += cross_entropy(logits.flatten(0, 1), targets.flatten()).sum().item()
        count += targets.numel()
    model.train(was_training)
    return Evaluation(total / count, count)


def evaluate_checkpoint(
    path: str, split: str, batch_size: int | None = None, data: str | None = None, precision: str | None = None
) -> dict[str, Any]:
    """``tiedlm eval``: the perplexity of a checkpoint (or a run's best/) on one split.

    Defaults are the checkpoint's own: its corpus, its config's ``data.eval_batch_size`` and the
    precision it was trained in. Returns the record ``tiedlm eval --json`` prints."""
    from tiedlm.checkpoint import load_checkpoint
    from tiedlm.data import load_corpus
    from tiedlm.precision import resolve_precision, warn_if_emulated
    from tiedlm.runtime import resolve_device

    device = resolve_device("auto")
    checkpoint = load_checkpoint(path, device)
    config = checkpoint.config
    corpus = load_corpus(data or config.data.corpus, vocab=checkpoint.vocab)
    size = batch_size or config.data.eval_batch_size
    resolved, _ = resolve_precision(precision or config.train.precision, device)
    warn_if_emulated(resolved, device, "--precision")
    result = evaluate(
        checkpoint.model, corpus.split(split), size, config.data.bptt, resolved,
        where=corpus.describe(split), option="--batch-size" if batch_size else "data.eval_batch_size",
    )  # fmt: skip
    return {
        "checkpoint": str(checkpoint.path),
        "corpus": corpus.name,
        "split": split,
        "batch_size": size,
        "precision": resolved,
        "tokens": result.tokens,
        "loss": result.loss,
        "perplexity": result.perplexity,
    }
