"""One optimisation step on one BPTT window: forward → objective → backward → clip → update.

The objective of one window is the per-token loss summed over time and averaged over the
batch, Σ_t Σ_b J_tb / B, which is what lr = 1 assumes (Zaremba et al.); J is cross-entropy,
plus γ·τ·KL(ỹ‖ŷ) with the augmented loss (docs/method.md §3, tiedlm/loss/augmented.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from tiedlm.config import Config, TrainConfig
from tiedlm.data import detach_state
from tiedlm.distributed import World
from tiedlm.loss import (
    DEFAULT_CHUNK_ELEMENTS,
    STATIC_CHUNK_ELEMENTS,
    AugmentedLoss,
    cross_entropy,
    linear_cross_entropy,
)
from tiedlm.models.base import LanguageModel
from tiedlm.precision import autocast, resolve_precision


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (the paper's) or AdamW, over every parameter, at ``config.lr`` (the schedule sets it per epoch)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """lr of 1-based ``epoch``: constant, then ×lr_decay per epoch from epoch lr_decay_start on."""
    return config.lr * config.lr_decay ** max(0, epoch - config.lr_decay_start + 1)


@dataclass
class StepResult:
    ce: float  # summed cross-entropy of the window's tokens
    kl: float  # summed KL (0 without the augmented loss)
    tokens: int
    state: tuple[torch.Tensor, ...]
    finite: bool  # False: the loss or gradient was NaN/inf and no update was made
    stop: bool = False  # some rank was asked to stop (all ranks agree)


PHASES = ("step.forward_and_loss", "step.backward", "step.clip_and_sync", "step.optimizer")


class TrainingStep:
    """One optimisation step on one BPTT window: forward, loss, backward, clipping, SGD update.

    The objective is Σ_t Σ_b J_tb / B (summed over time, averaged over the batch). Under data
    parallelism ``forward`` is the DistributedDataParallel wrapper, each rank averages over its
    own B/N streams, and the reported sums are over all ranks.

    A step is :meth:`compute` (forward, loss, backward, clipping: no host synchronisation, the
    part a CUDA graph captures, see tiedlm/cuda_graph.py) then :meth:`finish` (one sync for the
    sums, the non-finite check, the update). ``static_shapes`` runs the augmented loss's target
    side over every token (tiedlm/loss/static.py) instead of the unique targets.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Config,
        world: World | None = None,
        forward: torch.nn.Module | None = None,
        precision: str | None = None,
        static_shapes: bool = False,
    ):
        self.model, self.optimizer = model, optimizer
        self.world = world or World()
        self.forward = forward or model
        if config.train.compile_model:
            self.forward = torch.compile(self.forward)
        loss = config.loss
        chunk = STATIC_CHUNK_ELEMENTS if static_shapes else DEFAULT_CHUNK_ELEMENTS
        self.augmented = None
        if loss.augmented:
            compiled = config.train.compile
            self.augmented = AugmentedLoss(
                loss.tau, loss.gamma, loss.detach_target, chunk, compiled=compiled, static_shapes=static_shapes
            )
        # Without the AL the step forms W·h + b itself, fused with the cross-entropy (tiedlm/loss/linear.py),
        # from ``model(..., decode=False)``: models that keep the base class's forward (models/base.py).
        self.fused_decoder = isinstance(model, LanguageModel) and type(model).forward is LanguageModel.forward
        self.batch_size = config.data.batch_size // self.world.size
        self.bptt = config.data.bptt  # a full window's length (the captured step's static shape)
        self.clip = config.train.clip if config.train.clip > 0 else math.inf
        # The fault-injection hook (docs/faults.md): None in training; a function that gets each window's
        # per-token cross-entropy and returns what the step goes on with (e.g. NaN, for the rollback tests).
        self.fault_hook: Callable[[torch.Tensor], torch.Tensor] | None = None
        # ``precision`` is the resolved one (fp32 or bf16) where the config says auto.
        self.precision = precision or resolve_precision(config.train.precision, next(model.parameters()).device)[0]

    def window_loss(self, inputs, targets, state, masks=None):
        """Per-token cross-entropy (and KL with the augmented loss) of one window.

        ``masks``: the window's dropout masks, drawn beforehand (LSTM only); None: the model draws them."""
        model, forward = self.model, self.forward
        flat_targets = targets.flatten()
        given = {} if masks is None else {"masks": masks}
        with autocast(inputs.device, self.precision):
            if self.augmented is None and self.fused_decoder:
                hidden, state = forward(inputs, state, decode=False, **given)
                weight, bias = model.decoder.weight, model.output_bias
                return linear_cross_entropy(hidden.flatten(0, 1), weight, bias, flat_targets), None, state
            if self.augmented is None:
                logits, state = forward(inputs, state, **given)
                return cross_entropy(logits.flatten(0, 1), flat_targets), None, state
            logits, state = forward(inputs, state, include_bias=False, **given)  # AL needs the bias-free W·h
            ce, kl = self.augmented.components(
                logits.flatten(0, 1), flat_targets, model.embedding.weight, model.output_bias
            )
        return ce, kl, state

    def compute(self, inputs: torch.Tensor, targets: torch.Tensor, state, masks=None):
        """Forward, loss, backward and clipping of one window into gradients that were None.

        Returns the device tensor [Σ ce, Σ kl, objective, gradient norm] (fp32) and the new state.
        Nothing here reads a value back to the host (with ``static_shapes`` nothing has a
        data-dependent shape either), so a CUDA graph can capture it.
        """
        # The record_function ranges name the phases in a torch.profiler trace (benchmarks/profile_step.py).
        with record_function(PHASES[0]):
            ce, kl, new_state = self.window_loss(inputs, targets, detach_state(state), masks)
            if self.fault_hook is not None:
                ce = self.fault_hook(ce)
            objective = ce.sum() if kl is None else self.augmented.objective(ce.sum(), kl.sum())
        with record_function(PHASES[1]):
            (objective / self.batch_size).backward()  # DDP averages the gradients over the ranks here
        with record_function(PHASES[2]):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            kl_sum = objective.new_zeros(()) if kl is None else kl.sum()
            stats = torch.stack([ce.sum(), kl_sum, objective, grad_norm]).float()
        return stats, new_state

    def finish(self, stats: torch.Tensor, tokens: int, stop: bool, new_state) -> StepResult:
        """The sums over all ranks (one sync), the non-finite check and, when finite, the update."""
        with record_function(PHASES[2]):
            flags = stats.new_tensor([float(stop), float(tokens)])
            ce_sum, kl_sum, total, norm, stops, tokens = self.world.all_reduce_sum(torch.cat([stats, flags])).tolist()
        finite = math.isfinite(total) and math.isfinite(norm)  # the same decision on every rank
        if finite:
            with record_function(PHASES[3]):
                self.optimizer.step()
        return StepResult(ce_sum, kl_sum, int(tokens), new_state, finite, stops > 0)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, state, stop: bool = False) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        stats, new_state = self.compute(inputs, targets, state)
        return self.finish(stats, targets.numel(), stop, new_state)
