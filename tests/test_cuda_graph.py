"""The captured training step (tiedlm.cuda_graph), as far as a CPU can exercise it.

A CPU cannot capture a CUDA graph, so these tests hold each piece to the eager step: the plan
(which runs are captured), the masks drawn outside the model, the static buffers and the state
copied in and out, a stand-in graph that replays like a real one (capture once, rewrite the
same output and gradient tensors), and the captured region's ops (no host sync, no
data-dependent shape, which is what a CUDA graph needs).
"""

import json

import pytest
import torch

from test_static_loss import OpRecorder
from tiedlm.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
from tiedlm.cuda_graph import CapturedStep, StaticBuffers, draw_masks, plan_step
from tiedlm.distributed import World
from tiedlm.errors import TiedlmError
from tiedlm.models import build_model
from tiedlm.training import TrainingStep, make_optimizer

VOCAB, T, B = 37, 5, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**changes) -> Config:
    model = dict(hidden_size=8, num_layers=2, dropout=0.4, dropout_mode="exact", tie_weights=True, output_bias="on")
    loss = dict(augmented=True, tau=4.0, gamma=0.5, detach_target=False)
    for key, value in changes.items():
        (model if key in model or key == "architecture" else loss)[key] = value
    return Config(
        seed=2, data=DataConfig(batch_size=B, bptt=T), model=ModelConfig(**model), loss=LossConfig(**loss),
        train=TrainConfig(clip=0.5, device="cpu"),
    )  # fmt: skip


def build(config: Config, static: bool, seed: int = 5):
    """A model, optimizer and step; the same seed gives the same weights and the same masks."""
    torch.manual_seed(seed)
    model = build_model(config.model, VOCAB)
    model.mask_generator = torch.Generator().manual_seed(seed)
    model.train()
    optimizer = make_optimizer(model, config.train)
    return model, TrainingStep(model, optimizer, config, static_shapes=static)


def windows(count: int, tail: int | None = None, seed: int = 11):
    generator = torch.Generator().manual_seed(seed)
    lengths = [T] * count + ([tail] if tail else [])
    return [
        (torch.randint(0, VOCAB, (n, B), generator=generator), torch.randint(0, VOCAB, (n, B), generator=generator))
        for n in lengths
    ]


def train(step, model, batches, **_):
    """Runs the windows the way Trainer.train_epoch does (the state carried, reset after a bad step)."""
    state, results = model.init_state(B), []
    for inputs, targets in batches:
        result = step(inputs, targets, state)
        state = result.state if result.finite else model.init_state(B)
        results.append(result)
    return results


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: the capture records the step (running it once to get its
    output tensors), and every replay runs it again and writes into those same output and gradient
    tensors, which is what a real replay does to the memory the graph was recorded on."""

    captured = 0

    def __init__(self, stream):
        self.fn = None

    def capture(self, fn):
        FakeGraph.captured += 1
        self.fn = fn
        self.outputs = fn()
        return self.outputs

    def replay(self):
        params = [p for p in self.model_params()]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        stats, state = self.fn()
        self.outputs[0].copy_(stats)
        for mine, new in zip(self.outputs[1], state, strict=True):
            mine.copy_(new)
        for p, grad in zip(params, grads, strict=True):
            grad.copy_(p.grad)
            p.grad = grad


def fake_graph_for(model):
    class Bound(FakeGraph):
        def model_params(self):
            return model.parameters()

    return Bound


def assert_same_results(a, b, exact=True):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.finite and y.finite and x.tokens == y.tokens
        if exact:
            assert (x.ce, x.kl) == (y.ce, y.kl)
            assert all(torch.equal(p, q) for p, q in zip(x.state, y.state, strict=True))
        else:
            assert x.ce == pytest.approx(y.ce, rel=1e-5) and x.kl == pytest.approx(y.kl, rel=1e-5)


def assert_same_weights(a, b, exact=True):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


# --- the plan -----------------------------------------------------------------------------------


def test_plan_captures_an_exact_lstm_on_cuda_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    config = tiny_config()
    assert plan_step(config, cuda, World())[0] is True
    captured, why = plan_step(config, cpu, World())
    assert not captured and "the device is cpu" in why
    assert plan_step(config, cuda, World(size=2))[0] is False  # DDP stays eager
    assert plan_step(tiny_config(architecture="rhn"), cuda, World())[0] is False
    assert plan_step(tiny_config(dropout_mode="fast"), cuda, World())[0] is False  # auto: exact masks only
    config.train.cuda_graph = "off"
    captured, why = plan_step(config, cuda, World())
    assert not captured and why.startswith("eager (train.cuda_graph = off); recurrence: ")
    config.train.cuda_graph = "on"
    assert plan_step(tiny_config(dropout_mode="fast"), cuda, World())[0] is False
    fast = tiny_config(dropout_mode="fast")
    fast.train.cuda_graph = "on"
    assert plan_step(fast, cuda, World())[0] is True  # asked for: fast masks are captured too
    with pytest.raises(TiedlmError, match="cannot be captured: the device is cpu"):
        plan_step(config, cpu, World())


# --- the pieces: masks, buffers, state ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_masks_drawn_outside_the_model_are_the_ones_it_draws(mode):
    config = tiny_config(dropout_mode=mode)
    ((inputs, _),) = windows(1)
    a, _ = build(config, static=False)
    b, _ = build(config, static=False)
    logits_a, state_a = a(inputs, a.init_state(B))
    masks = draw_masks(b, B)
    assert [m.shape for m in masks] == [(B if mode == "exact" else 1, 8)] * 3
    logits_b, state_b = b(inputs, b.init_state(B), masks=masks)
    assert torch.equal(logits_a, logits_b) and all(torch.equal(x, y) for x, y in zip(state_a, state_b, strict=True))
    b.eval()
    assert draw_masks(b, B) is None  # evaluation draws none


def test_static_buffers_copy_windows_in_at_fixed_addresses():
    (inputs, targets), (inputs2, targets2) = windows(2)
    state = (torch.randn(2, B, 8), torch.randn(2, B, 8))
    masks = [torch.rand(B, 8) for _ in range(3)]
    buffers = StaticBuffers.like(inputs, targets, state, masks)
    addresses = [buffers.inputs.data_ptr(), buffers.state[1].data_ptr(), buffers.masks[2].data_ptr()]
    buffers.load(inputs, targets, state, masks)
    buffers.load(inputs2, targets2, state, masks)
    assert torch.equal(buffers.inputs, inputs2) and torch.equal(buffers.targets, targets2)
    assert torch.equal(buffers.state[1], state[1]) and torch.equal(buffers.masks[2], masks[2])
    assert addresses == [buffers.inputs.data_ptr(), buffers.state[1].data_ptr(), buffers.masks[2].data_ptr()]
    assert buffers.fits(inputs, targets, state)
    assert not buffers.fits(inputs[:2], targets[:2], state)  # the last, shorter window of an epoch
    with pytest.raises(RuntimeError, match="masks"):
        buffers.load(inputs, targets, state, None)


# --- the step: buffered and (stand-in) captured against eager ----------------------------------


@pytest.mark.parametrize("augmented", [True, False])
def test_buffered_step_equals_the_eager_step_bit_for_bit(augmented):
    config = tiny_config(augmented=augmented)
    batches = windows(4, tail=2)
    eager_model, eager = build(config, static=True)
    model, static = build(config, static=True)
    buffered = CapturedStep(static, capture=False)
    assert_same_results(train(buffered, model, batches), train(eager, eager_model, batches))
    assert_same_weights(model, eager_model)
    assert buffered.counts() == {"replayed": 0, "buffered": 4, "eager": 1}


def test_buffered_static_step_tracks_the_unique_target_eager_step():
    config = tiny_config()
    batches = windows(4)
    eager_model, eager = build(config, static=False)  # torch.unique on the target side
    model, static = build(config, static=True)
    assert_same_results(train(CapturedStep(static, capture=False), model, batches), train(eager, eager_model, batches),
                        exact=False)  # fmt: skip
    assert_same_weights(model, eager_model, exact=False)


@pytest.mark.parametrize("detach", [False, True])
def test_replayed_step_equals_the_eager_step(detach):
    # Warm-up windows, one capture, replays, an eager window of another shape in between (which
    # replaces the parameters' gradients: the replays must bind the graph's own again), replays.
    config = tiny_config(detach_target=detach)
    batches = windows(4, tail=3) + windows(3, seed=12)
    eager_model, eager = build(config, static=True)
    model, static = build(config, static=True)
    FakeGraph.captured = 0
    captured = CapturedStep(static, capture=True, warmup=2, graph_factory=fake_graph_for(model))
    assert_same_results(train(captured, model, batches), train(eager, eager_model, batches))
    assert_same_weights(model, eager_model)
    assert FakeGraph.captured == 1
    assert captured.counts() == {"replayed": 5, "buffered": 2, "eager": 1}


def test_only_full_windows_are_captured_even_when_a_shorter_one_comes_first():
    # A run resumed at the last (shorter) window of an epoch: the buffers are still for full windows.
    config = tiny_config()
    batches = windows(1, tail=2)[1:] + windows(4)
    eager_model, eager = build(config, static=True)
    model, static = build(config, static=True)
    captured = CapturedStep(static, capture=True, warmup=1, graph_factory=fake_graph_for(model))
    assert_same_results(train(captured, model, batches), train(eager, eager_model, batches))
    assert captured.counts() == {"replayed": 3, "buffered": 1, "eager": 1}
    assert captured.buffers.inputs.shape == (T, B)


def test_a_failed_capture_goes_on_eagerly_or_stops_when_required():
    class Failing:
        def __init__(self, stream):
            pass

        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    config = tiny_config()
    batches = windows(4)
    eager_model, eager = build(config, static=True)
    model, static = build(config, static=True)
    said = []
    step = CapturedStep(static, capture=True, warmup=1, graph_factory=Failing, say=said.append)
    assert_same_results(train(step, model, batches), train(eager, eager_model, batches))
    assert len(said) == 1 and "capture failed (RuntimeError: operation not permitted" in said[0]
    assert step.counts() == {"replayed": 0, "buffered": 2, "eager": 2}
    _, static = build(config, static=True)
    strict = CapturedStep(static, capture=True, warmup=0, graph_factory=Failing, strict=True)
    with pytest.raises(TiedlmError, match="could not be captured"):
        strict(*batches[0], model.init_state(B))


@pytest.mark.parametrize("variant", [dict(), dict(augmented=False), dict(tie_weights=False, output_bias="auto")])
def test_the_captured_region_needs_no_host_sync(variant):
    # What a CUDA graph cannot hold: a value read back to the host, or a data-dependent shape.
    config = tiny_config(**variant)
    ((inputs, targets),) = windows(1)
    model, step = build(config, static=True)
    masks = draw_masks(model, B)
    recorder = OpRecorder()
    with recorder:
        step.compute(inputs, targets, model.init_state(B), masks)
    assert {"mm", "addmm"} <= set(recorder.ops)  # forward and backward were recorded
    assert not recorder.syncing, recorder.syncing
    if config.loss.augmented:  # the recorder can tell: the unique-target loss synchronises
        model, step = build(config, static=False)
        recorder = OpRecorder()
        with recorder:
            step.compute(inputs, targets, model.init_state(B), draw_masks(model, B))
        assert recorder.syncing


# --- through the trainer -------------------------------------------------------------------------


def test_training_through_the_buffered_step_matches_eager_training(tmp_path, config_file, monkeypatch):
    from tiedlm.cli import main
    from tiedlm.training import loop

    assert main(["train", str(config_file), "--out", str(tmp_path / "eager")]) == 0
    monkeypatch.setattr(loop, "plan_step", lambda *args: (True, "buffered (test)"))
    assert main(["train", str(config_file), "--out", str(tmp_path / "buffered")]) == 0
    eager, buffered = (
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("eager", "buffered")
    )
    for a, b in zip(eager, buffered, strict=True):
        assert b["valid_ppl"] == pytest.approx(a["valid_ppl"], rel=1e-4)
        assert b["train_kl"] == pytest.approx(a["train_kl"], rel=1e-4)
    assert buffered[-1]["windows"]["buffered"] > 0 and buffered[-1]["windows"]["replayed"] == 0
    assert "windows" not in eager[-1]
    info = json.loads((tmp_path / "buffered" / "run.json").read_text())
    assert info["training_step"] == "buffered (test)"
    assert json.loads((tmp_path / "eager" / "run.json").read_text())["training_step"].startswith("eager")


def test_cuda_graph_on_without_cuda_is_a_one_line_error(tmp_path, config_file, capsys):
    from tiedlm.cli import main

    assert main(["train", str(config_file), "--out", str(tmp_path / "r"), "--set", "train.cuda_graph=on"]) == 2
    assert "train.cuda_graph = on, but the step cannot be captured: the device is cpu" in capsys.readouterr().err
