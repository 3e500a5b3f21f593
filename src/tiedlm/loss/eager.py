"""Cross-entropy and the augmented KL in hand-written blocks (Inan et al. 2017, §3; docs/method.md §3).

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

Longer than 400 lines because the forward and backward passes share one block layout and read best together.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of fp32 per (tokens × |V|) block: a WikiText-2 window (700 × 33,278) is one


def groups(
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


def matmul_in(a: torch.Tensor, b: torch.Tensor, product: torch.dtype) -> torch.Tensor:
    """a @ b with the inputs in ``product`` (bf16 under bf16 training), the result in a's dtype."""
    if product == a.dtype:
        return a @ b
    return (a.to(product) @ b.to(product)).to(a.dtype)


def target_log_probs(
    embedding: torch.Tensor, target_ids: torch.Tensor, *, tau: float, product: torch.dtype
) -> torch.Tensor:
    """log ỹ for each target id: log_softmax(L[y] · Lᵀ / τ), shape (U, |V|)."""
    return torch.log_softmax(matmul_in(embedding[target_ids] / tau, embedding.t(), product), dim=-1)


def scaled_logits(logits: torch.Tensor, tau: float, dtype: torch.dtype) -> torch.Tensor:
    """logits / τ in ``dtype``, read from bf16 logits and converted in the same pass (a one-element
    tensor takes part in type promotion, a Python number would not)."""
    return logits * torch.full((1,), 1.0 / tau, dtype=dtype, device=logits.device)


def _uniform(weights: torch.Tensor) -> float | None:
    """The common value of ``weights`` when they are all equal (as in a summed loss), else None."""
    first = weights[:1]
    return float(first) if weights.numel() and bool((weights == first).all()) else None


def softmax_and_lse(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(x) and logsumexp(x) in ``dtype`` along the last dimension with one exponential pass: the
    largest probability sits where the largest entry is, so lse = max x − log max p (max p ≥ 1/|V|)."""
    p = torch.softmax(x, dim=-1, dtype=dtype)
    return p, x.amax(-1).to(dtype) - p.amax(-1).log()


class Block(NamedTuple):
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


class Units(NamedTuple):
    """The target side of one unit block: log ỹ and ỹ, (U, V) each, for ``target_ids``."""

    target_ids: torch.Tensor
    log_q: torch.Tensor
    q: torch.Tensor


def unit_block(logits, emb, *, tau: float, target_ids) -> Units:
    """ỹ of ``target_ids`` in ``emb``'s dtype, its product L[y]·Lᵀ in the logits' dtype."""
    log_q = target_log_probs(emb, target_ids, tau=tau, product=logits.dtype)
    return Units(target_ids, log_q, log_q.exp())


def token_block(logits, emb, units: Units, *, tau: float, tokens, row) -> Block:
    """One token chunk's arrays in ``emb``'s dtype, against its unit block's ỹ."""
    scaled = scaled_logits(logits[tokens], tau, emb.dtype)
    p_hat, lse = softmax_and_lse(scaled, emb.dtype)
    return Block(
        target_ids=units.target_ids, tokens=tokens, row=row, p_hat=p_hat, scaled=scaled, lse=lse,
        q_rows=units.q.index_select(0, row), log_q=units.log_q, q=units.q,
    )  # fmt: skip


def kl_forward(logits: torch.Tensor, emb: torch.Tensor, targets: torch.Tensor, *, tau: float, chunk_rows: int):
    """Per-token KL(ỹ ‖ ŷ) in blocks; returns (kl, kept) for the backward pass.

    ``kept`` is the one block of a batch that fits one (ŷ and ỹ), or else the unit block's ỹ when
    all the batch's distinct targets fit one unit block (its tokens in several chunks), or None.
    The loss is computed in ``emb``'s dtype; the target side's matrix products take their inputs
    in the logits' dtype."""
    kl = emb.new_empty(logits.size(0))
    kept: Block | Units | None = None
    for index, (target_ids, chunks) in enumerate(groups(targets, chunk_rows)):
        units = unit_block(logits, emb, tau=tau, target_ids=target_ids)
        neg_entropy = torch.linalg.vecdot(units.q, units.log_q)  # (U,) Σ ỹ log ỹ
        for tokens, row in chunks:
            block = token_block(logits, emb, units, tau=tau, tokens=tokens, row=row)
            cross = torch.linalg.vecdot(block.q_rows, block.scaled) - block.lse  # Σ ỹ log ŷ, as Σ ỹ = 1
            kl[block.tokens] = neg_entropy[block.row] - cross
            if isinstance(block.tokens, slice):  # one block: keep it for the backward pass
                kept = block
            del block  # before the next chunk is built: one chunk's arrays at a time
        if kept is None or isinstance(kept, Units):
            kept = units if index == 0 else None  # ỹ of a single unit block is kept, of several not
        del units
    return kl, kept


def kl_backward(
    logits: torch.Tensor,
    emb: torch.Tensor,
    targets: torch.Tensor,
    kl: torch.Tensor,
    g: torch.Tensor,
    *,
    tau: float,
    chunk_rows: int,
    kept: Block | Units | None,
    grad_z: torch.Tensor | None,
    want_z: bool,
    train_target: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of Σ g·KL: (ŷ − ỹ)/τ·g added into ``grad_z`` (or returned as a new tensor when it is None),
    and the gradient into L through ỹ when ``train_target``. Returns (grad_z, grad_emb).

    ``kept`` is what :func:`kl_forward` kept (a whole block, or a unit block's ỹ), else None: then
    ỹ is recomputed once per unit block and ŷ once per token chunk. ``logits`` is converted to the
    loss's dtype only when blocks are recomputed (not a kept whole block)."""
    grad_emb = None
    whole = isinstance(kept, Block)
    if want_z and grad_z is None and not whole:
        grad_z = torch.zeros_like(logits, dtype=g.dtype)
    if whole:
        unit_blocks = [(Units(target_ids=kept.target_ids, log_q=kept.log_q, q=kept.q), [kept])]
    else:
        unit_blocks = recomputed_blocks(logits, emb, targets, kept, tau=tau, chunk_rows=chunk_rows)
    for units, blocks in unit_blocks:
        target = TargetGradient(units, g.dtype) if train_target else None
        for block in blocks:
            weights = g[block.tokens]
            if want_z:
                grad_z = _add_logit_gradient(grad_z, block, weights=weights, tau=tau)
            if target is not None:
                target.add(block, weights=weights, kl=kl)
            del block  # before the next chunk is built
        if target is not None:
            grad_emb = target.into(grad_emb, emb, tau=tau, product=logits.dtype)
        del units, target
    if train_target and grad_emb is None:
        grad_emb = torch.zeros_like(emb)
    return grad_z, grad_emb


def recomputed_blocks(logits, emb, targets, kept: Units | None, *, tau: float, chunk_rows: int):
    """The backward pass's blocks when the forward kept no whole block: per unit block, its ỹ (``kept``
    when the forward kept the one unit block's, else formed again) and a generator of its token blocks,
    so that one chunk's (n, V) arrays exist at a time."""
    for target_ids, chunks in groups(targets, chunk_rows):
        units = kept if kept is not None else unit_block(logits, emb, tau=tau, target_ids=target_ids)
        yield units, (token_block(logits, emb, units, tau=tau, tokens=tokens, row=row) for tokens, row in chunks)


def _add_logit_gradient(grad_z, block: Block, *, weights: torch.Tensor, tau: float):
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


class TargetGradient:
    """The gradient into L through ỹ of one unit block, summed over its token chunks.

    ∂KL_t/∂s_j = ỹ_j (log ỹ_j − log ŷ_tj − KL_t) for the scores s = L[y]·Lᵀ/τ. Summed over the tokens
    t that share target u, with weights g_t: ỹ_u ⊙ (G_u log ỹ_u − S_u − K_u), where G_u = Σ g_t,
    K_u = Σ g_t KL_t and S_u = Σ g_t log ŷ_t = Σ g_t z_t/τ − Σ g_t lse_t: one (n, V) pass per chunk
    instead of five, and the two products with L once per unit block.
    """

    def __init__(self, units: Units, dtype):
        self.units = units
        count, vocab = units.q.shape
        self.d_rows = torch.zeros(count, vocab, dtype=dtype, device=units.q.device)
        self.totals = torch.zeros(2, count, dtype=dtype, device=units.q.device)

    def add(self, block: Block, *, weights: torch.Tensor, kl: torch.Tensor) -> None:
        common = _uniform(weights)
        if common is not None:  # a summed loss: every g_t alike, no weighted copy of z/τ
            self.d_rows.index_add_(0, block.row, block.scaled, alpha=-common)  # −Σ g_t z_t/τ
        else:
            self.d_rows.index_add_(0, block.row, block.scaled * weights.unsqueeze(1), alpha=-1.0)
        self.totals[0].index_add_(0, block.row, weights)  # G_u
        self.totals[1].index_add_(0, block.row, weights * (kl[block.tokens] - block.lse))  # K_u − Σ g_t lse_t

    def into(self, grad_emb, emb, *, tau: float, product: torch.dtype):
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


def loss_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def softmax_and_cross_entropy(x: torch.Tensor, targets: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(x) (N, V), kept for the backward pass, and −log softmax(x)[y] = lse − x_y per token, in dtype."""
    p, lse = softmax_and_lse(x, dtype)
    return p, lse - x.gather(1, targets.unsqueeze(1)).squeeze(1).to(dtype)


def cross_entropy_grad(p: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(softmax − onehot(y)) · g per token, in a fresh tensor (``p`` is left as it is)."""
    out = p * grad.unsqueeze(1)
    out[torch.arange(targets.numel(), device=targets.device), targets] -= grad
    return out


class _AugmentedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, embedding, targets, tau, chunk_rows, train_target):
        dtype = loss_dtype(logits)
        with torch.autocast(logits.device.type, enabled=False):
            kl, kept = kl_forward(logits, embedding.to(dtype), targets, tau=tau, chunk_rows=chunk_rows)
        ctx.save_for_backward(logits, embedding, targets, kl)
        ctx.tau, ctx.chunk_rows, ctx.train_target, ctx.kept = tau, chunk_rows, train_target, kept
        return kl.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_kl):
        logits, embedding, targets, kl = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        dtype = kl.dtype
        with torch.autocast(logits.device.type, enabled=False):
            grad_z, grad_emb = kl_backward(
                logits, embedding.to(dtype), targets, kl, grad_kl.to(dtype), tau=ctx.tau, chunk_rows=ctx.chunk_rows,
                kept=kept, grad_z=None, want_z=ctx.needs_input_grad[0],
                train_target=ctx.train_target and ctx.needs_input_grad[1],
            )  # fmt: skip
        grad_logits = grad_z.to(logits.dtype) if grad_z is not None else None
        grad_embedding = grad_emb.to(embedding.dtype) if grad_emb is not None else None
        return grad_logits, grad_embedding, None, None, None, None


def cross_entropy_and_kl_function(kl_forward, kl_backward) -> type[torch.autograd.Function]:
    """The autograd function for cross-entropy of z + b and KL(ỹ ‖ softmax(z/τ)) per token.

    ``kl_forward`` / ``kl_backward`` are the KL's block passes: this module's work over unique
    targets, or ``tiedlm.loss.static``'s over every token (static shapes, for CUDA graphs); both
    take the keyword arguments of :func:`kl_forward` / :func:`kl_backward` here. The
    backward writes softmax(z + b) − onehot(y) into a fresh (N, |V|) tensor and adds (ŷ − ỹ)/τ
    into it block by block, instead of two full-size gradients and their sum.
    """

    class CrossEntropyAndKL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, bias, embedding, targets, tau, chunk_rows, train_target):
            dtype = loss_dtype(logits)
            with torch.autocast(logits.device.type, enabled=False):
                shifted = logits if bias is None else logits + bias.to(dtype)  # bf16 + fp32: fp32, one pass
                p, ce = softmax_and_cross_entropy(shifted, targets, dtype)
                kl, kept = kl_forward(logits, embedding.to(dtype), targets, tau=tau, chunk_rows=chunk_rows)
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
                    grad_z = cross_entropy_grad(p, targets, grad_ce.to(dtype))
                    if ctx.has_bias and ctx.needs_input_grad[1]:
                        grad_bias = grad_z.sum(0)
                if grad_kl is not None:
                    grad_z, grad_emb = kl_backward(
                        logits, embedding.to(dtype), targets, kl, grad_kl.to(dtype), tau=ctx.tau,
                        chunk_rows=ctx.chunk_rows, kept=kept, grad_z=grad_z, want_z=ctx.needs_input_grad[0],
                        train_target=ctx.train_target and ctx.needs_input_grad[2],
                    )  # fmt: skip
            grad_logits = grad_z.to(logits.dtype) if grad_z is not None and ctx.needs_input_grad[0] else None
            grad_embedding = grad_emb.to(embedding.dtype) if grad_emb is not None else None
            return grad_logits, grad_bias, grad_embedding, None, None, None, None

    return CrossEntropyAndKL


CrossEntropyAndKL = cross_entropy_and_kl_function(kl_forward, kl_backward)


def check_shapes(logits: torch.Tensor, targets: torch.Tensor, embedding: torch.Tensor) -> None:
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
    check_shapes(logits, targets, embedding)
    chunk_rows = max(1, max_chunk_elements // logits.size(1))
    return _AugmentedKL.apply(logits, embedding, targets, float(tau), chunk_rows, not detach_target)


class _CrossEntropy(torch.autograd.Function):
    """−log softmax(z)[y] per token; keeps softmax(z), so the backward pass needs no exponential."""

    @staticmethod
    def forward(ctx, logits, targets):
        with torch.autocast(logits.device.type, enabled=False):
            p, ce = softmax_and_cross_entropy(logits, targets, torch.float32)
        ctx.save_for_backward(p, targets)
        ctx.input_dtype = logits.dtype
        return ce

    @staticmethod
    def backward(ctx, grad):
        p, targets = ctx.saved_tensors
        return cross_entropy_grad(p, targets, grad).to(ctx.input_dtype), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token −log softmax(z + b)[y], computed in fp32, shape (N,)."""
    if bias is not None:
        logits = logits + bias
    if not torch.is_grad_enabled() or not logits.requires_grad:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    return _CrossEntropy.apply(logits, targets)
