"""Cross-entropy and the augmented loss (Inan et al. 2017, §3; docs/method.md §3).

For a token with target word y* and model logits z = W·h (bias-free):

    ŷ = softmax(z / τ)                       the model's distribution at temperature τ
    ỹ = softmax(L · L[y*] / τ)               the target's neighbours in embedding space
    J_aug = KL(ỹ ‖ ŷ) = Σ_i ỹ_i (log ỹ_i − log ŷ_i)
    J_tot = CE(z + b, y*) + γ·τ · J_aug      (α = γτ, linear in τ: the paper's appendix)

and ∂J_aug/∂z = (ŷ − ỹ)/τ. Whether ỹ is a constant target or also trains L is
the ``detach_target`` setting.

ỹ depends only on the target id, so it is computed once per unique target in
the batch. Tokens are processed grouped by target: unit blocks of at most
``max_chunk_elements`` entries of (targets × |V|), each formed once and shared by
its tokens, in chunks of at most as many (tokens × |V|) entries, in both the
forward and the backward pass, which recomputes rather than stores, so memory
stays bounded for large vocabularies. A batch that fits in one chunk keeps ŷ and ỹ
for the backward pass; a batch whose distinct targets fit one unit block keeps ỹ
(WikiText-2 at the default bound fits one chunk; WikiText-103 needs several).
The τ-softmaxes run in fp32 (fp64 for fp64 inputs)
with autocast disabled, each softmax with one exponential pass (its log-normaliser read off the
largest probability), so the backward passes reuse ŷ instead of exponentiating log ŷ again;
the target side's matrix products (L[y]·Lᵀ and the gradient into L)
take their inputs in the logits' dtype, so bf16 training runs them in bf16 like the decoder.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of fp32 per (tokens × |V|) block: a WikiText-2 window (700 × 33,278) is one


def _groups(
    targets: torch.Tensor, chunk_rows: int
) -> Iterator[tuple[torch.Tensor, list[tuple[torch.Tensor | slice, torch.Tensor]]]]:
    """Yield (target_ids, chunks) blocks: ``target_ids`` (U,) distinct targets and ``chunks`` a list of
    (token_index, row) that together cover, once each, the tokens whose target is among them.

    ``token_index`` selects tokens and ``row`` says which of the U each one's target is; U ≤ chunk_rows
    and every chunk has ≤ chunk_rows tokens, so ỹ is formed once per unit block however many token
    chunks share it. When the whole batch fits in one chunk there is one block with one chunk,
    ``token_index`` = ``slice(None)`` (all tokens, in order: no gathering).
    """
    unique, inverse, counts = torch.unique(targets, return_inverse=True, return_counts=True)
    if targets.numel() <= chunk_rows:
        yield unique, [(slice(None), inverse)]
        return
    order = torch.argsort(inverse, stable=True)  # tokens grouped by target
    ends = torch.cumsum(counts, 0).tolist()
    starts = [0] + ends[:-1]
    for u0 in range(0, unique.numel(), chunk_rows):
        u1 = min(u0 + chunk_rows, unique.numel())
        chunks = []
        for t0 in range(starts[u0], ends[u1 - 1], chunk_rows):
            tokens = order[t0 : min(t0 + chunk_rows, ends[u1 - 1])]
            chunks.append((tokens, inverse[tokens] - u0))
        yield unique[u0:u1], chunks


def _mm(a: torch.Tensor, b: torch.Tensor, product: torch.dtype) -> torch.Tensor:
    """a @ b with the inputs in ``product`` (bf16 under bf16 training), the result in a's dtype."""
    if product == a.dtype:
        return a @ b
    return (a.to(product) @ b.to(product)).to(a.dtype)


def _target_log_probs(embedding: torch.Tensor, target_ids: torch.Tensor, tau: float, product) -> torch.Tensor:
    """log ỹ for each target id: log_softmax(L[y] · Lᵀ / τ), shape (U, |V|)."""
    return torch.log_softmax(_mm(embedding[target_ids] / tau, embedding.t(), product), dim=-1)


def _scaled(logits: torch.Tensor, tau: float, dtype: torch.dtype) -> torch.Tensor:
    """logits / τ in ``dtype``, read from bf16 logits and converted in the same pass (a one-element
    tensor takes part in type promotion, a Python number would not)."""
    return logits * torch.full((1,), 1.0 / tau, dtype=dtype, device=logits.device)


def _uniform(weights: torch.Tensor) -> float | None:
    """The common value of ``weights`` when they are all equal (as in a summed loss), else None."""
    first = weights[:1]
    return float(first) if weights.numel() and bool((weights == first).all()) else None


def _softmax_and_lse(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(x) and logsumexp(x) in ``dtype`` along the last dimension with one exponential pass: the
    largest probability sits where the largest entry is, so lse = max x − log max p (max p ≥ 1/|V|)."""
    p = torch.softmax(x, dim=-1, dtype=dtype)
    return p, x.amax(-1).to(dtype) - p.amax(-1).log()


class _Block(NamedTuple):
    """One block of the KL: tokens whose targets are ``target_ids``; (n, V) rows per token, (U, V) per unit."""

    target_ids: torch.Tensor  # (U,)
    tokens: torch.Tensor | slice  # which tokens of the batch
    row: torch.Tensor  # (n,) which of the U each token's target is
    p_hat: torch.Tensor  # (n, V) ŷ = softmax(z/τ)
    scaled: torch.Tensor  # (n, V) z/τ
    lse: torch.Tensor  # (n,) logsumexp(z/τ), so log ŷ = z/τ − lse
    q_rows: torch.Tensor  # (n, V) ỹ of each token's target
    log_q: torch.Tensor  # (U, V) log ỹ
    q: torch.Tensor  # (U, V) ỹ


class _Units(NamedTuple):
    """The target side of one unit block: log ỹ and ỹ, (U, V) each, for ``target_ids``."""

    target_ids: torch.Tensor
    log_q: torch.Tensor
    q: torch.Tensor


def _units(logits, emb, tau, target_ids) -> _Units:
    """ỹ of ``target_ids`` in ``emb``'s dtype, its product L[y]·Lᵀ in the logits' dtype."""
    log_q = _target_log_probs(emb, target_ids, tau, logits.dtype)
    return _Units(target_ids, log_q, log_q.exp())


def _block(logits, emb, tau, units: _Units, tokens, row) -> _Block:
    """One token chunk's arrays in ``emb``'s dtype, against its unit block's ỹ."""
    scaled = _scaled(logits[tokens], tau, emb.dtype)
    p_hat, lse = _softmax_and_lse(scaled, emb.dtype)
    return _Block(units.target_ids, tokens, row, p_hat, scaled, lse, units.q.index_select(0, row), units.log_q, units.q)


def _kl_forward(logits: torch.Tensor, emb: torch.Tensor, targets: torch.Tensor, tau: float, chunk_rows: int):
    """Per-token KL(ỹ ‖ ŷ) in blocks; returns (kl, kept) for the backward pass.

    ``kept`` is the one block of a batch that fits one (ŷ and ỹ), or else the unit block's ỹ when
    all the batch's distinct targets fit one unit block (its tokens in several chunks), or None.
    The loss is computed in ``emb``'s dtype; the target side's matrix products take their inputs
    in the logits' dtype."""
    kl = emb.new_empty(logits.size(0))
    kept: _Block | _Units | None = None
    for index, (target_ids, chunks) in enumerate(_groups(targets, chunk_rows)):
        units = _units(logits, emb, tau, target_ids)
        neg_entropy = torch.linalg.vecdot(units.q, units.log_q)  # (U,) Σ ỹ log ỹ
        for tokens, row in chunks:
            block = _block(logits, emb, tau, units, tokens, row)
            cross = torch.linalg.vecdot(block.q_rows, block.scaled) - block.lse  # Σ ỹ log ŷ, as Σ ỹ = 1
            kl[block.tokens] = neg_entropy[block.row] - cross
            if isinstance(block.tokens, slice):  # one block: keep it for the backward pass
                kept = block
            del block  # before the next chunk is built: one chunk's arrays at a time
        if kept is None or isinstance(kept, _Units):
            kept = units if index == 0 else None  # ỹ of a single unit block is kept, of several not
        del units
    return kl, kept


def _kl_backward(
    logits, emb, targets, kl, g, tau, chunk_rows, kept, grad_z: torch.Tensor | None, want_z: bool, train_target: bool
):
    """Gradients of Σ g·KL: (ŷ − ỹ)/τ·g added into ``grad_z`` (or returned as a new tensor when it is None),
    and the gradient into L through ỹ when ``train_target``. Returns (grad_z, grad_emb).

    ``kept`` is what :func:`_kl_forward` kept (a whole block, or a unit block's ỹ), else None: then
    ỹ is recomputed once per unit block and ŷ once per token chunk. ``logits`` is converted to the
    loss's dtype only when blocks are recomputed (not a kept whole block)."""
    grad_emb = None
    whole = isinstance(kept, _Block)
    if want_z and grad_z is None and not whole:
        grad_z = torch.zeros_like(logits, dtype=g.dtype)
    if whole:
        unit_blocks = [(_Units(kept.target_ids, kept.log_q, kept.q), [kept])]
    else:
        unit_blocks = (
            (units, (_block(logits, emb, tau, units, tokens, row) for tokens, row in chunks))
            for units, chunks in (
                (kept if kept is not None else _units(logits, emb, tau, target_ids), chunks)
                for target_ids, chunks in _groups(targets, chunk_rows)
            )
        )
    for units, blocks in unit_blocks:
        target = _TargetGradient(units, g.dtype) if train_target else None
        for block in blocks:
            weights = g[block.tokens]
            if want_z:
                grad_z = _add_logit_gradient(grad_z, block, weights, tau)
            if target is not None:
                target.add(block, weights, kl)
            del block  # before the next chunk is built
        if target is not None:
            grad_emb = target.into(grad_emb, emb, tau, logits.dtype)
        del units, target
    if train_target and grad_emb is None:
        grad_emb = torch.zeros_like(emb)
    return grad_z, grad_emb


def _add_logit_gradient(grad_z, block: _Block, weights, tau):
    """grad_z[tokens] += (ŷ − ỹ)/τ · g (a new tensor when grad_z is None and the block is whole)."""
    scale = (weights / tau).unsqueeze(1)
    tokens = block.tokens
    if grad_z is None:
        return (block.p_hat - block.q_rows).mul_(scale)  # (ŷ − ỹ)/τ
    if isinstance(tokens, slice):
        grad_z.addcmul_(block.p_hat, scale).addcmul_(block.q_rows, scale, value=-1.0)
    else:
        grad_z[tokens] += (block.p_hat - block.q_rows).mul_(scale)  # the tokens of a chunk are distinct
    return grad_z


class _TargetGradient:
    """The gradient into L through ỹ of one unit block, summed over its token chunks.

    ∂KL_t/∂s_j = ỹ_j (log ỹ_j − log ŷ_tj − KL_t) for the scores s = L[y]·Lᵀ/τ. Summed over the tokens
    t that share target u, with weights g_t: ỹ_u ⊙ (G_u log ỹ_u − S_u − K_u), where G_u = Σ g_t,
    K_u = Σ g_t KL_t and S_u = Σ g_t log ŷ_t = Σ g_t z_t/τ − Σ g_t lse_t: one (n, V) pass per chunk
    instead of five, and the two products with L once per unit block.
    """

    def __init__(self, units: _Units, dtype):
        self.units = units
        count, vocab = units.q.shape
        self.d_rows = torch.zeros(count, vocab, dtype=dtype, device=units.q.device)
        self.totals = torch.zeros(2, count, dtype=dtype, device=units.q.device)

    def add(self, block: _Block, weights, kl) -> None:
        common = _uniform(weights)
        if common is not None:  # a summed loss: every g_t alike, no weighted copy of z/τ
            self.d_rows.index_add_(0, block.row, block.scaled, alpha=-common)  # −Σ g_t z_t/τ
        else:
            self.d_rows.index_add_(0, block.row, block.scaled * weights.unsqueeze(1), alpha=-1.0)
        self.totals[0].index_add_(0, block.row, weights)  # G_u
        self.totals[1].index_add_(0, block.row, weights * (kl[block.tokens] - block.lse))  # K_u − Σ g_t lse_t

    def into(self, grad_emb, emb, tau, product):
        """grad_emb + ∂/∂L of this block (grad_emb None: a new tensor): ds/τ·L into the rows L[y], dsᵀ·L[y]/τ into L."""
        units, totals = self.units, self.totals
        d_rows = self.d_rows.addcmul_(units.log_q, totals[0].unsqueeze(1)).sub_(totals[1].unsqueeze(1))
        d_rows.mul_(units.q).mul_(1.0 / tau)
        d_product = d_rows.to(product)  # converted once for both products (a no-op in fp32)
        del d_rows, self.d_rows
        into_all = (d_product.t() @ emb[units.target_ids].to(product)).to(emb.dtype)  # (V, d)
        grad_emb = into_all if grad_emb is None else grad_emb.add_(into_all)
        grad_emb.index_add_(0, units.target_ids, (d_product @ emb.to(product)).to(emb.dtype))
        return grad_emb


def _float(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _softmax_and_cross_entropy(x: torch.Tensor, targets: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(x) (N, V), kept for the backward pass, and −log softmax(x)[y] = lse − x_y per token, in dtype."""
    p, lse = _softmax_and_lse(x, dtype)
    return p, lse - x.gather(1, targets.unsqueeze(1)).squeeze(1).to(dtype)


def _cross_entropy_grad(p: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(softmax − onehot(y)) · g per token, in a fresh tensor (``p`` is left as it is)."""
    out = p * grad.unsqueeze(1)
    out[torch.arange(targets.numel(), device=targets.device), targets] -= grad
    return out


class _AugmentedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, embedding, targets, tau, chunk_rows, train_target):
        dtype = _float(logits)
        with torch.autocast(logits.device.type, enabled=False):
            kl, kept = _kl_forward(logits, embedding.to(dtype), targets, tau, chunk_rows)
        ctx.save_for_backward(logits, embedding, targets, kl)
        ctx.tau, ctx.chunk_rows, ctx.train_target, ctx.kept = tau, chunk_rows, train_target, kept
        return kl.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_kl):
        logits, embedding, targets, kl = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        dtype = kl.dtype
        with torch.autocast(logits.device.type, enabled=False):
            grad_z, grad_emb = _kl_backward(
                logits, embedding.to(dtype), targets, kl, grad_kl.to(dtype), ctx.tau, ctx.chunk_rows,
                kept, None, ctx.needs_input_grad[0], ctx.train_target and ctx.needs_input_grad[1],
            )  # fmt: skip
        grad_logits = grad_z.to(logits.dtype) if grad_z is not None else None
        grad_embedding = grad_emb.to(embedding.dtype) if grad_emb is not None else None
        return grad_logits, grad_embedding, None, None, None, None


def cross_entropy_and_kl_function(kl_forward, kl_backward) -> type[torch.autograd.Function]:
    """The autograd function for cross-entropy of z + b and KL(ỹ ‖ softmax(z/τ)) per token.

    ``kl_forward`` / ``kl_backward`` are the KL's block passes: this module's work over unique
    targets, or ``tiedlm.static_loss``'s over every token (static shapes, for CUDA graphs). The
    backward writes softmax(z + b) − onehot(y) into a fresh (N, |V|) tensor and adds (ŷ − ỹ)/τ
    into it block by block, instead of two full-size gradients and their sum.
    """

    class CrossEntropyAndKL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, bias, embedding, targets, tau, chunk_rows, train_target):
            dtype = _float(logits)
            with torch.autocast(logits.device.type, enabled=False):
                shifted = logits if bias is None else logits + bias.to(dtype)  # bf16 + fp32: fp32, one pass
                p, ce = _softmax_and_cross_entropy(shifted, targets, dtype)
                kl, kept = kl_forward(logits, embedding.to(dtype), targets, tau, chunk_rows)
            ctx.save_for_backward(logits, embedding, targets, kl, p)
            ctx.tau, ctx.chunk_rows, ctx.train_target, ctx.kept = tau, chunk_rows, train_target, kept
            ctx.has_bias = bias is not None
            return ce, kl

        @staticmethod
        def backward(ctx, grad_ce, grad_kl):
            logits, embedding, targets, kl, p = ctx.saved_tensors
            kept, ctx.kept = ctx.kept, None
            dtype = kl.dtype
            grad_z = grad_bias = grad_emb = None
            with torch.autocast(logits.device.type, enabled=False):
                if grad_ce is not None:
                    grad_z = _cross_entropy_grad(p, targets, grad_ce.to(dtype))
                    if ctx.has_bias and ctx.needs_input_grad[1]:
                        grad_bias = grad_z.sum(0)
                if grad_kl is not None:
                    grad_z, grad_emb = kl_backward(
                        logits, embedding.to(dtype), targets, kl, grad_kl.to(dtype), ctx.tau, ctx.chunk_rows,
                        kept, grad_z, ctx.needs_input_grad[0], ctx.train_target and ctx.needs_input_grad[2],
                    )  # fmt: skip
            grad_logits = grad_z.to(logits.dtype) if grad_z is not None and ctx.needs_input_grad[0] else None
            grad_embedding = grad_emb.to(embedding.dtype) if grad_emb is not None else None
            return grad_logits, grad_bias, grad_embedding, None, None, None, None

    return CrossEntropyAndKL


_CrossEntropyAndKL = cross_entropy_and_kl_function(_kl_forward, _kl_backward)


def _check_shapes(logits: torch.Tensor, targets: torch.Tensor, embedding: torch.Tensor) -> None:
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or embedding.size(0) != logits.size(1):
        raise ValueError(
            f"augmented_kl: expected logits (N, V), targets (N,), embedding (V, d); got "
            f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(embedding.shape)}"
        )


def augmented_kl(
    logits: torch.Tensor,
    targets: torch.Tensor,
    embedding: torch.Tensor,
    tau: float,
    *,
    detach_target: bool = False,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Per-token KL(ỹ ‖ ŷ) of the augmented loss, shape (N,).

    logits: (N, |V|) bias-free W·h; targets: (N,) int64; embedding: L, (|V|, d).
    With ``detach_target`` ỹ is a constant; otherwise the gradient also flows
    into L through ỹ.
    """
    _check_shapes(logits, targets, embedding)
    chunk_rows = max(1, max_chunk_elements // logits.size(1))
    return _AugmentedKL.apply(logits, embedding, targets, float(tau), chunk_rows, not detach_target)


class _CrossEntropy(torch.autograd.Function):
    """−log softmax(z)[y] per token; keeps softmax(z), so the backward pass needs no exponential."""

    @staticmethod
    def forward(ctx, logits, targets):
        with torch.autocast(logits.device.type, enabled=False):
            p, ce = _softmax_and_cross_entropy(logits, targets, torch.float32)
        ctx.save_for_backward(p, targets)
        ctx.input_dtype = logits.dtype
        return ce

    @staticmethod
    def backward(ctx, grad):
        p, targets = ctx.saved_tensors
        return _cross_entropy_grad(p, targets, grad).to(ctx.input_dtype), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token −log softmax(z + b)[y], computed in fp32, shape (N,)."""
    if bias is not None:
        logits = logits + bias
    if not torch.is_grad_enabled() or not logits.requires_grad:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    return _CrossEntropy.apply(logits, targets)


class AugmentedLoss(nn.Module):
    """J_tot = CE(z + b) + γ·τ·KL(ỹ ‖ ŷ) per token (docs/method.md §3).

    Call as ``loss_fn(logits, targets, embedding, bias=None)`` with bias-free
    logits (N, |V|); returns (N,). Reduce it like cross-entropy. With ``compiled``
    a bias-free batch that fits one block goes through ``tiedlm.fused_loss``
    (torch.compile fuses its (tokens × |V|) passes); the mathematics is the same.
    With ``static_shapes`` the target side runs over every token instead of the unique
    targets (``tiedlm.static_loss``: no data-dependent shape, capturable in a CUDA graph).
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
        _check_shapes(logits, targets, embedding)
        if not torch.is_grad_enabled():
            kl = augmented_kl(logits, targets, embedding, self.tau, max_chunk_elements=self.max_chunk_elements)
            return cross_entropy(logits, targets, bias), kl.float()
        if self.static_shapes:  # the captured training step (tiedlm.cuda_graph)
            from tiedlm.static_loss import static_components

            return static_components(
                logits, targets, embedding, self.tau, bias=bias, detach_target=self.detach_target,
                max_chunk_elements=self.max_chunk_elements,
            )  # fmt: skip
        if self.compiled and bias is None and logits.numel() <= self.max_chunk_elements:
            from tiedlm.fused_loss import fused_components

            return fused_components(logits, targets, embedding, self.tau, self.detach_target)
        chunk_rows = max(1, self.max_chunk_elements // logits.size(1))
        ce, kl = _CrossEntropyAndKL.apply(
            logits, bias, embedding, targets, self.tau, chunk_rows, not self.detach_target
        )
        return ce.float(), kl.float()

    def forward(self, logits, targets, embedding, bias=None) -> torch.Tensor:
        ce, kl = self.components(logits, targets, embedding, bias)
        return ce + self.gamma * self.tau * kl

    def extra_repr(self) -> str:
        text = f"tau={self.tau}, gamma={self.gamma}, detach_target={self.detach_target}, compiled={self.compiled}"
        return text + (", static_shapes=True" if self.static_shapes else "")
