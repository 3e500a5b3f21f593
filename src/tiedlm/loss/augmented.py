"""The augmented loss as the trainer uses it: J_tot = CE(z + b) + γ·τ·KL(ỹ ‖ ŷ) (docs/method.md §3).

:class:`AugmentedLoss` picks one of three implementations of the same (CE, KL) pair and
:meth:`AugmentedLoss.objective` weights them; nothing else forms γ·τ·KL:

    eager     tiedlm.loss.eager     hand-written blocks over the unique targets (the default)
    compiled  tiedlm.loss.compiled  the (tokens × |V|) passes fused by torch.compile (train.compile)
    static    tiedlm.loss.static    the target side over every token, for CUDA-graph capture
"""

from __future__ import annotations

import torch
from torch import nn

from tiedlm.loss import eager
from tiedlm.loss.eager import DEFAULT_CHUNK_ELEMENTS, augmented_kl, cross_entropy


class AugmentedLoss(nn.Module):
    """J_tot = CE(z + b) + γ·τ·KL(ỹ ‖ ŷ) per token (docs/method.md §3).

    Call as ``loss_fn(logits, targets, embedding, bias=None)`` with bias-free
    logits (N, |V|); returns (N,). Reduce it like cross-entropy. With ``compiled``
    a bias-free batch that fits one block goes through ``tiedlm.loss.compiled``
    (torch.compile fuses its (tokens × |V|) passes); the mathematics is the same.
    With ``static_shapes`` the target side runs over every token instead of the unique
    targets (``tiedlm.loss.static``: no data-dependent shape, capturable in a CUDA graph).
    """

    def __init__(
        self,
        tau: float,
        gamma: float,
        detach_target: bool = False,
        max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        *,
        compiled: bool = False,
        static_shapes: bool = False,
    ):
        super().__init__()
        self.tau, self.gamma, self.detach_target = float(tau), float(gamma), detach_target
        self.max_chunk_elements = max_chunk_elements
        self.compiled = compiled
        self.static_shapes = static_shapes

    def components(
        self, logits: torch.Tensor, targets: torch.Tensor, embedding: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy, KL) per token, before weighting; one fused autograd node with one gradient buffer."""
        eager.check_shapes(logits, targets, embedding)
        if not torch.is_grad_enabled():
            kl = augmented_kl(logits, targets, embedding, self.tau, max_chunk_elements=self.max_chunk_elements)
            return cross_entropy(logits, targets, bias), kl.float()
        if self.static_shapes:  # the captured training step (tiedlm.cuda_graph)
            from tiedlm.loss.static import static_components

            return static_components(
                logits, targets, embedding, self.tau, bias=bias, detach_target=self.detach_target,
                max_chunk_elements=self.max_chunk_elements,
            )  # fmt: skip
        if self.compiled and bias is None and logits.numel() <= self.max_chunk_elements:
            from tiedlm.loss.compiled import fused_components

            return fused_components(logits, targets, embedding, self.tau, detach_target=self.detach_target)
        chunk_rows = max(1, self.max_chunk_elements // logits.size(1))
        ce, kl = eager.CrossEntropyAndKL.apply(
            logits, bias, embedding, targets, self.tau, chunk_rows, not self.detach_target
        )
        return ce.float(), kl.float()

    def objective(self, ce: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """J_tot = CE + γ·τ·KL, for per-token values or their sums alike (α = γτ: the paper's appendix)."""
        return ce + self.gamma * self.tau * kl

    def forward(self, logits, targets, embedding, bias=None) -> torch.Tensor:
        return self.objective(*self.components(logits, targets, embedding, bias))

    def extra_repr(self) -> str:
        text = f"tau={self.tau}, gamma={self.gamma}, detach_target={self.detach_target}, compiled={self.compiled}"
        return text + (", static_shapes=True" if self.static_shapes else "")
