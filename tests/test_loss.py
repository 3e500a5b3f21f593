import pytest
import torch

import tiedlm
from tiedlm.loss import AugmentedLoss, augmented_kl
from tiedlm.loss import eager as loss_module

V, D, N, TAU = 11, 4, 23, 2.0


@pytest.fixture
def problem():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, dtype=torch.float64, generator=generator, requires_grad=True)
    embedding = torch.randn(V, D, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[:5] = 3  # repeated targets share one ỹ row
    return logits, targets, embedding


def brute_force_kl(logits, targets, embedding, tau):
    """KL(ỹ‖ŷ) straight from the definition, token by token, in float64."""
    rows = []
    for n in range(logits.size(0)):
        target_scores = embedding @ embedding[targets[n]] / tau
        y_tilde = torch.exp(target_scores - torch.logsumexp(target_scores, 0))
        log_y_hat = logits[n] / tau - torch.logsumexp(logits[n] / tau, 0)
        rows.append((y_tilde * (torch.log(y_tilde) - log_y_hat)).sum())
    return torch.stack(rows)


@pytest.mark.parametrize("chunk", [1 << 24, 3 * V, V, 15 * V])  # one block, several, one token each, one ỹ
def test_equals_brute_force(problem, chunk):
    logits, targets, embedding = problem
    kl = augmented_kl(logits, targets, embedding, TAU, max_chunk_elements=chunk)
    torch.testing.assert_close(kl, brute_force_kl(logits, targets, embedding, TAU), rtol=1e-12, atol=1e-12)


def test_public_api_is_importable():
    assert tiedlm.augmented_kl is augmented_kl and tiedlm.AugmentedLoss is AugmentedLoss


@pytest.mark.parametrize("chunk", [1 << 24, 2 * V, 15 * V])
def test_gradcheck_trained_target(problem, chunk):
    logits, targets, embedding = problem
    fn = lambda z, e: augmented_kl(z, targets, e, TAU, detach_target=False, max_chunk_elements=chunk)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits, embedding))


def test_gradcheck_detached_target(problem):
    logits, targets, embedding = problem
    embedding = embedding.detach()
    fn = lambda z: augmented_kl(z, targets, embedding, TAU, detach_target=True, max_chunk_elements=2 * V)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


def test_trained_target_gradient_matches_autograd_of_definition(problem):
    logits, targets, embedding = problem
    weights = torch.rand(N, dtype=torch.float64)
    ours = torch.autograd.grad(
        (augmented_kl(logits, targets, embedding, TAU, detach_target=False) * weights).sum(), (logits, embedding)
    )
    reference = torch.autograd.grad(
        (brute_force_kl(logits, targets, embedding, TAU) * weights).sum(), (logits, embedding)
    )
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_logit_gradient_is_y_hat_minus_y_tilde_over_tau(problem):
    logits, targets, embedding = problem
    grad_logits, grad_embedding = torch.autograd.grad(
        augmented_kl(logits, targets, embedding, TAU, detach_target=True).sum(),
        (logits, embedding),
        allow_unused=True,
    )
    y_hat = torch.softmax(logits / TAU, -1)
    y_tilde = torch.softmax(embedding[targets] @ embedding.t() / TAU, -1)
    torch.testing.assert_close(grad_logits, (y_hat - y_tilde) / TAU, rtol=1e-12, atol=1e-14)
    assert grad_embedding is None  # a detached target does not train L


def test_kl_is_nonnegative_and_zero_at_target_logits(problem):
    logits, targets, embedding = problem
    assert (augmented_kl(logits, targets, embedding, TAU) >= 0).all()
    target_logits = (embedding[targets] @ embedding.t()).detach()  # ŷ = ỹ exactly
    kl = augmented_kl(target_logits, targets, embedding, TAU)
    torch.testing.assert_close(kl, torch.zeros(N, dtype=torch.float64), atol=1e-12, rtol=0)


def test_target_distribution_computed_once_per_unique_target(problem, monkeypatch):
    logits, targets, embedding = problem
    seen = []
    original = loss_module.target_log_probs
    monkeypatch.setattr(
        loss_module,
        "target_log_probs",
        lambda e, ids, **kw: seen.append(ids) or original(e, ids, **kw),
    )
    augmented_kl(logits, targets, embedding, TAU)
    ids = torch.cat(seen)
    assert ids.numel() == targets.unique().numel() == ids.unique().numel()


def test_blocks_never_exceed_the_chunk_bound(problem, monkeypatch):
    logits, targets, embedding = problem
    chunk_rows = 3
    blocks = list(loss_module.groups(targets, chunk_rows))
    chunks = [(ids, tokens, row) for ids, block in blocks for tokens, row in block]
    assert all(ids.numel() <= chunk_rows and tokens.numel() <= chunk_rows for ids, tokens, _ in chunks)
    covered = torch.cat([tokens for _, tokens, _ in chunks])
    assert sorted(covered.tolist()) == list(range(N))
    for ids, tokens, row in chunks:
        assert torch.equal(ids[row], targets[tokens])
    assert torch.equal(torch.cat([ids for ids, _ in blocks]), targets.unique())  # each target in one block


@pytest.mark.parametrize("train_target", [False, True])
def test_target_side_formed_once_when_the_targets_fit_one_block(problem, monkeypatch, train_target):
    # More tokens than a chunk holds but few distinct targets (WikiText-2 medium: 700 tokens,
    # ~390 targets, 504 rows per chunk): ỹ is formed once, in the forward pass, and kept; the
    # token chunks share it, and the gradient into L is two products for the whole batch.
    logits, targets, embedding = problem
    unique = targets.unique().numel()
    chunk = unique * V  # room for every distinct target, fewer than N tokens per chunk
    assert unique < N
    seen, original = [], loss_module.target_log_probs
    monkeypatch.setattr(loss_module, "target_log_probs", lambda *a, **kw: seen.append(a[1]) or original(*a, **kw))
    weights = torch.rand(N, dtype=torch.float64)
    kl = augmented_kl(logits, targets, embedding, TAU, detach_target=not train_target, max_chunk_elements=chunk)
    ours = torch.autograd.grad((kl * weights).sum(), (logits, embedding), allow_unused=True)
    assert len(seen) == 1 and seen[0].numel() == unique
    reference = torch.autograd.grad(
        (brute_force_kl(logits, targets, embedding if train_target else embedding.detach(), TAU) * weights).sum(),
        (logits, embedding),
        allow_unused=True,
    )
    for a, b in zip(ours, reference, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_augmented_loss_is_ce_plus_gamma_tau_kl(problem):
    logits, targets, embedding = problem
    bias = torch.randn(V, dtype=torch.float64)
    loss_fn = AugmentedLoss(tau=TAU, gamma=0.7)
    expected = torch.nn.functional.cross_entropy((logits + bias).float(), targets, reduction="none")
    expected = expected + 0.7 * TAU * brute_force_kl(logits, targets, embedding, TAU).float()
    torch.testing.assert_close(loss_fn(logits, targets, embedding, bias=bias), expected, rtol=1e-5, atol=1e-5)


def test_runs_in_float32_under_bfloat16_inputs(problem):
    logits, targets, embedding = problem
    kl = augmented_kl(logits.detach().bfloat16(), targets, embedding.detach().bfloat16(), TAU)
    assert kl.dtype == torch.bfloat16
    reference = brute_force_kl(
        logits.detach().bfloat16().double(), targets, embedding.detach().bfloat16().double(), TAU
    )
    torch.testing.assert_close(kl.double(), reference, rtol=2e-2, atol=2e-3)


def test_shape_errors_are_reported(problem):
    logits, targets, embedding = problem
    with pytest.raises(ValueError, match="expected logits"):
        augmented_kl(logits, targets[:-1], embedding, TAU)


def test_cross_entropy_matches_pytorch_with_gradients():
    from tiedlm.loss import cross_entropy

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 7, (9,), generator=generator)
    weights = torch.rand(9, dtype=torch.float64, generator=generator)
    ours = cross_entropy(logits, targets, bias)
    reference = torch.nn.functional.cross_entropy((logits + bias).float(), targets, reduction="none")
    torch.testing.assert_close(ours, reference)
    mine = torch.autograd.grad((ours * weights.float()).sum(), (logits, bias))
    theirs = torch.autograd.grad((reference * weights.float()).sum(), (logits, bias))
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# one block (ŷ, ỹ kept); several blocks (recomputed); one unit block in two token chunks (ỹ kept)
@pytest.mark.parametrize("chunk", [1 << 24, 3 * V, 15 * V])
@pytest.mark.parametrize("train_target", [False, True])
def test_fused_cross_entropy_and_kl_gradients(problem, chunk, train_target):
    # AugmentedLoss runs CE and KL as one autograd node with one gradient buffer for the logits.
    logits, targets, embedding = problem
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    chunk_rows = max(1, chunk // V)

    def fused(z, b, e):
        ce, kl = loss_module.CrossEntropyAndKL.apply(z, b, e, targets, TAU, chunk_rows, train_target)
        return (ce * weights[0]).sum() + (kl * weights[1]).sum()

    if train_target:
        assert torch.autograd.gradcheck(fused, (logits, bias, embedding))
    else:  # ỹ is a constant: no gradient reaches L through it (a stop-gradient, not a numerical derivative)
        assert torch.autograd.gradcheck(lambda z, b: fused(z, b, embedding.detach()), (logits, bias))
    # The same values and gradients as the two losses computed apart.
    inputs = (logits, bias, embedding)
    grads = torch.autograd.grad(fused(*inputs), inputs, allow_unused=True)
    ce = torch.nn.functional.cross_entropy(logits + bias, targets, reduction="none")
    kl = augmented_kl(logits, targets, embedding, TAU, detach_target=not train_target, max_chunk_elements=chunk)
    apart = torch.autograd.grad((ce * weights[0]).sum() + (kl * weights[1]).sum(), inputs, allow_unused=True)
    assert (grads[2] is None) == (not train_target)
    for got, want in zip(grads, apart, strict=True):
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fused_loss_with_one_output_unused(problem):
    logits, targets, embedding = problem
    ce, kl = loss_module.CrossEntropyAndKL.apply(logits, None, embedding, targets, TAU, 100, False)
    (grad,) = torch.autograd.grad(kl.sum(), logits)  # no gradient reaches the CE output
    (expected,) = torch.autograd.grad(augmented_kl(logits, targets, embedding, TAU).sum(), logits)
    torch.testing.assert_close(grad, expected)
    ce, _ = loss_module.CrossEntropyAndKL.apply(logits, None, embedding, targets, TAU, 100, False)
    (grad,) = torch.autograd.grad(ce.sum(), logits)
    (expected,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), logits)
    torch.testing.assert_close(grad, expected)


def test_softmax_and_lse_match_torch_even_for_extreme_logits():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1000, generator=generator) * 5
    x[0] += 1e4  # a huge offset: a naive exp would overflow
    x[1, 7] = 200.0  # one dominant entry: every other probability underflows
    x[2] = 0.0  # all equal: the largest probability is 1/|V|
    p, lse = loss_module.softmax_and_lse(x, torch.float32)
    torch.testing.assert_close(p, torch.softmax(x, -1))
    torch.testing.assert_close(lse, torch.logsumexp(x, -1), rtol=1e-6, atol=1e-5)


def test_cross_entropy_is_exact_where_the_target_probability_underflows():
    logits = torch.zeros(2, 50)
    logits[:, 0] = 120.0  # softmax gives the target (index 5) probability exp(-120): 0 in fp32
    targets = torch.tensor([5, 0])
    ce = loss_module.cross_entropy(logits.requires_grad_(), targets)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    assert torch.isfinite(ce).all() and ce[0] > 119


def test_bf16_logits_track_the_fp32_loss_and_gradients():
    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(40, 300, generator=generator) * 4).bfloat16()
    embedding = torch.randn(300, 16, generator=generator) * 0.5
    targets = torch.randint(0, 300, (40,), generator=generator)
    results = []
    for z in (logits.float(), logits):  # the same values; the second runs the target side's products in bf16
        z = z.clone().requires_grad_()
        e = embedding.clone().requires_grad_()
        ce, kl = AugmentedLoss(tau=5.0, gamma=0.5).components(z, targets, e)
        grads = torch.autograd.grad(ce.sum() + kl.sum(), (z, e))
        assert ce.dtype == kl.dtype == torch.float32 and grads[0].dtype == z.dtype
        results.append((ce, kl, grads[0].float(), grads[1]))
    for ours, exact in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, exact, rtol=0.03, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_equals_the_eager_loss(dtype, monkeypatch):
    from tiedlm.loss import compiled as fused_loss

    calls, original = [], fused_loss._token_forward
    monkeypatch.setattr(fused_loss, "_token_forward", lambda *a: calls.append(1) or original(*a))
    fused_loss._compiled.cache_clear()  # compile the counting wrapper
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(60, 500, generator=generator) * 3).to(dtype)
    embedding = torch.randn(500, 16, generator=generator) * 0.5
    targets = torch.randint(0, 500, (60,), generator=generator)
    targets[:10] = 7  # repeated targets
    weights = torch.rand(2, 60, generator=generator)  # unequal per-token weights
    results = []
    for compiled in (False, True):
        z, e = logits.clone().requires_grad_(), embedding.clone().requires_grad_()
        ce, kl = AugmentedLoss(5.0, 0.5, compiled=compiled).components(z, targets, e)
        grads = torch.autograd.grad((ce * weights[0]).sum() + (kl * weights[1]).sum(), (z, e))
        results.append((ce, kl, grads[0].float(), grads[1]))
    fused_loss._compiled.cache_clear()
    assert calls, "the compiled path did not run"
    for fused, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_compiled_loss_falls_back_to_eager_with_a_bias(monkeypatch):
    from tiedlm.loss import compiled as fused_loss

    monkeypatch.setattr(fused_loss, "fused_components", lambda *a, **k: pytest.fail("took the fused path"))
    logits, embedding = torch.randn(8, 20, requires_grad=True), torch.randn(20, 4)
    ce, kl = AugmentedLoss(2.0, 0.5, compiled=True).components(logits, torch.arange(8), embedding, torch.zeros(20))
    assert ce.shape == kl.shape == (8,)


def test_compiled_loss_that_cannot_be_built_gives_one_line(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    from tiedlm.errors import TiedlmError
    from tiedlm.loss import compiled as fused_loss

    def broken(_fn):
        def run(*args):
            raise TorchDynamoException("no working C++ compiler found\nlong traceback")

        return run

    monkeypatch.setattr(fused_loss.torch, "compile", broken)
    fused_loss._compiled.cache_clear()
    logits, embedding = torch.randn(8, 20, requires_grad=True), torch.randn(20, 4)
    with pytest.raises(TiedlmError, match=r"^train.compile: .*no working C\+\+ compiler found\); set train.compile"):
        AugmentedLoss(2.0, 0.5, compiled=True).components(logits, torch.arange(8), embedding)
    fused_loss._compiled.cache_clear()


def _decoder_problem(bias: bool, dtype=torch.float64):
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(13, 6, dtype=dtype, generator=generator, requires_grad=True)
    weight = torch.randn(17, 6, dtype=dtype, generator=generator, requires_grad=True)
    b = torch.randn(17, dtype=dtype, generator=generator, requires_grad=True) if bias else None
    targets = torch.randint(0, 17, (13,), generator=generator)
    return hidden, weight, b, targets


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_gradcheck(bias):
    """gradcheck's random output gradients take the per-token (non-uniform) branch."""
    from tiedlm.loss import linear_cross_entropy

    hidden, weight, b, targets = _decoder_problem(bias)
    inputs = (hidden, weight) if b is None else (hidden, weight, b)
    assert torch.autograd.gradcheck(
        lambda h, w, *rest: linear_cross_entropy(h, w, rest[0] if rest else None, targets), inputs
    )


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_with_a_batch_mean_equals_the_two_nodes(bias, dtype):
    """Σ/B, as the trainer's objective: the gradient arrives as one expanded number (the uniform branch)."""
    from tiedlm.loss import linear_cross_entropy

    hidden, weight, b, targets = _decoder_problem(bias, dtype)
    params = [t for t in (hidden, weight, b) if t is not None]
    ours = linear_cross_entropy(hidden, weight, b, targets)
    reference = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(hidden, weight, b), targets, reduction="none"
    )
    torch.testing.assert_close(ours, reference)
    mine = torch.autograd.grad(ours.sum() / 3, params)
    theirs = torch.autograd.grad(reference.sum() / 3, params)
    for a, c in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, c)


def test_linear_cross_entropy_leaves_its_saved_softmax_alone():
    """The backward pass must not turn the kept softmax into the gradient in place: twice, the same gradient."""
    from tiedlm.loss import linear_cross_entropy

    hidden, weight, b, targets = _decoder_problem(True)
    loss = linear_cross_entropy(hidden, weight, b, targets).sum() / 2
    first = torch.autograd.grad(loss, (hidden, weight, b), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight, b))
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


def test_linear_cross_entropy_under_autocast_is_the_two_node_path():
    from tiedlm.loss import cross_entropy, linear_cross_entropy

    hidden, weight, b, targets = _decoder_problem(True, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, b, targets)
        reference = cross_entropy(torch.nn.functional.linear(hidden, weight, b), targets)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_training_step_loss_and_gradients_equal_logits_then_cross_entropy(tmp_path):
    """The trainer's one-node decoder + loss (model(..., decode=False)) against model(...) logits → CE."""
    from tiedlm.config import load_config
    from tiedlm.data import batchify, bptt_windows, load_corpus
    from tiedlm.loss import cross_entropy
    from tiedlm.models import build_model
    from tiedlm.testing import write_config, write_corpus
    from tiedlm.training.step import TrainingStep, make_optimizer

    config = load_config(write_config(tmp_path / "c.toml", write_corpus(tmp_path), augmented=False))
    config.model.output_bias = "on"
    corpus = load_corpus(config.data.corpus)
    inputs, targets = next(iter(bptt_windows(batchify(corpus.train, config.data.batch_size), config.data.bptt)))
    torch.manual_seed(0)
    model = build_model(config.model, len(corpus.vocab)).train()
    masks = model.window_masks(inputs)
    step = TrainingStep(model, make_optimizer(model, config.train), config)
    assert step.fused_decoder
    state = model.init_state(config.data.batch_size)
    ce, kl, _ = step.window_loss(inputs, targets, state, masks)
    assert kl is None and "LinearCrossEntropy" in type(ce.grad_fn).__name__
    ours = torch.autograd.grad(ce.sum() / 4, list(model.parameters()))
    logits, _ = model(inputs, state, masks=masks)
    reference = cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(ce, reference)
    theirs = torch.autograd.grad(reference.sum() / 4, list(model.parameters()))
    for a, c in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, c)
