"""The static-shape augmented loss (tiedlm.loss.static) equals the unique-target one to rounding."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tiedlm.loss import AugmentedLoss
from tiedlm.loss.static import _spans, static_components

V, D, N, TAU = 13, 5, 29, 3.0


pytestmark = pytest.mark.usefixtures("one_thread")


# aten ops that read a value back to the host or give a data-dependent shape: none may run in a
# CUDA-graph capture (tests of the captured step use the same list).
SYNCING_OPS = {
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
    "_unique2", "unique_dim", "unique_consecutive", "bincount",
}  # fmt: skip


class OpRecorder(TorchDispatchMode):
    """Names of the aten ops that run inside it (backward passes included)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def syncing(self) -> set[str]:
        return set(self.ops) & SYNCING_OPS


def _problem(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, dtype=dtype, generator=generator)
    embedding = torch.randn(V, D, dtype=dtype, generator=generator)
    bias = torch.randn(V, dtype=dtype, generator=generator)
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[:6] = 4  # repeated targets: the unique path shares one ỹ row among them
    weights = torch.rand(2, N, dtype=dtype, generator=generator)
    return logits, bias, embedding, targets, weights


def _values_and_grads(static: bool, detach: bool, chunk: int, with_bias: bool, dtype=torch.float64):
    logits, bias, embedding, targets, weights = _problem(dtype)
    inputs = [t.clone().requires_grad_() for t in (logits, bias, embedding)]
    z, b, e = inputs
    loss = AugmentedLoss(TAU, 0.5, detach, max_chunk_elements=chunk, static_shapes=static)
    ce, kl = loss.components(z, targets, e, b if with_bias else None)
    objective = (ce * weights[0]).sum() + (kl * weights[1]).sum()
    grads = torch.autograd.grad(objective, inputs, allow_unused=True)
    return (ce, kl), grads


@pytest.mark.parametrize("chunk", [1 << 20, 7 * V, V])  # one block, several (the last one short), one token each
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_static_equals_unique_target_loss_values_and_gradients(chunk, detach, with_bias):
    (ce_s, kl_s), grads_s = _values_and_grads(True, detach, chunk, with_bias)
    (ce_u, kl_u), grads_u = _values_and_grads(False, detach, chunk, with_bias)
    torch.testing.assert_close(ce_s, ce_u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl_s, kl_u, rtol=1e-10, atol=1e-12)
    assert kl_s.abs().max() > 1e-3  # a non-trivial KL
    for name, got, want in zip(("logits", "bias", "embedding"), grads_s, grads_u, strict=True):
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    assert (grads_s[2] is None) == detach  # the target trains L unless detached
    assert (grads_s[1] is None) == (not with_bias)


def test_static_loss_in_fp32_matches_the_unique_target_loss_in_fp32():
    (ce_s, kl_s), grads_s = _values_and_grads(True, False, 1 << 20, True, torch.float32)
    (ce_u, kl_u), grads_u = _values_and_grads(False, False, 1 << 20, True, torch.float32)
    torch.testing.assert_close(kl_s, kl_u, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_s, grads_u, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_static_loss_under_bf16_logits_tracks_the_unique_target_loss():
    logits, bias, embedding, targets, _ = _problem(torch.float32)
    z = logits.bfloat16()
    ce_s, kl_s = static_components(z, targets, embedding, TAU, bias=bias)
    ce_u, kl_u = AugmentedLoss(TAU, 0.5).components(z.requires_grad_(), targets, embedding, bias)
    assert kl_s.dtype == torch.float32
    torch.testing.assert_close(ce_s, ce_u.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl_s, kl_u.detach(), rtol=2e-2, atol=2e-3)


def test_spans_cover_every_token_once_in_fixed_blocks():
    assert _spans(10, 10) == [slice(None)]
    spans = _spans(10, 4)
    assert spans == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert sum(s.stop - s.start for s in spans) == 10


@pytest.mark.parametrize("chunk", [1 << 20, 7 * V])
def test_static_loss_needs_no_host_sync_and_no_data_dependent_shape(chunk):
    logits, bias, embedding, targets, weights = _problem(torch.float32)
    inputs = [t.clone().requires_grad_() for t in (logits, bias, embedding)]
    for static, expect_sync in ((True, False), (False, True)):  # the unique-target loss does sync
        recorder = OpRecorder()
        with recorder:
            loss = AugmentedLoss(TAU, 0.5, max_chunk_elements=chunk, static_shapes=static)
            ce, kl = loss.components(inputs[0], targets, inputs[2], inputs[1])
            ((ce * weights[0]).sum() + (kl * weights[1]).sum()).backward()
        assert "index_add_" in recorder.ops  # the recorder saw the backward pass too
        assert bool(recorder.syncing) == expect_sync, recorder.syncing
