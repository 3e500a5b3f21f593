"""The training step replayed from a CUDA graph (``train.cuda_graph``): one launch per BPTT window.

Eager PyTorch launches each of the ~2,500 small kernels of an exact-mask LSTM window from
Python (35 steps × 2 layers, forward and backward), about 10 µs apiece; a CUDA graph replays
all of them from one launch. The mathematics is unchanged: the masks stay exact, per sequence,
the augmented loss keeps its trainable target and the full softmax.

    each window, eager (outside the graph)            captured once, then replayed
    ─────────────────────────────────────────         ─────────────────────────────────────
    copy inputs, targets, state → static buffers      forward: embedding, masked recurrence,
    draw the masks with the run's mask generator        decoder; the loss, with the AL target
      (the same calls, in the same order, as            side over every token (loss/static.py)
      eager training) → static buffers                backward, gradient clipping
    read the sums (one sync), the non-finite          the sums [Σ ce, Σ kl, objective, norm]
      check, the SGD/AdamW update
    copy the new state out of the graph's memory

The update stays outside the graph, so a non-finite step is skipped exactly as in eager training
and the learning rate changes per epoch without a new capture; the masks are drawn outside, so
they are bit for bit those of eager training, and the generator needs no graph registration.

Shapes: the graph is for the full window (bptt, B); a window of another shape (the last, shorter
one of an epoch) runs eagerly. The first ``warmup`` windows run eagerly on the capture stream
(cuBLAS workspaces, autograd's buffers) before the capture; they are real training steps. The
graph writes the gradients into tensors of its own, which are bound to the parameters again
before each replay (an eager window in between replaces them).

Every path runs the same step function, ``TrainingStep.compute`` then ``TrainingStep.finish``:
eager (``TrainingStep.__call__``), buffered (``capture=False``: the static buffers without a
graph, which is what a CPU can test) and captured. The evaluation pass is not captured: in
evaluation the LSTM runs on the fused cuDNN kernel, a few launches per window.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch

from tiedlm.config import Config
from tiedlm.distributed import World
from tiedlm.errors import TiedlmError

WARMUP_WINDOWS = 3  # eager windows before the capture (PyTorch's recipe for whole-network capture)


def plan_step(config: Config, device: torch.device, world: World) -> tuple[bool, str]:
    """Whether the training step is captured, and why (in words) — from ``train.cuda_graph``.

    ``on`` where the step cannot be captured is a one-line error; ``auto`` then stays eager.
    """
    captured, why = _plan(config, device, world)
    if device.type == "cuda" and config.model.architecture == "lstm" and config.model.dropout_mode == "exact":
        from tiedlm.cuda_cell import status

        why += f"; recurrence: {status('cuda')}"
    return captured, why


def _plan(config: Config, device: torch.device, world: World) -> tuple[bool, str]:
    setting = config.train.cuda_graph
    if setting == "off":
        return False, "eager (train.cuda_graph = off)"
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the device is {device.type}")
    if config.model.architecture != "lstm":
        reasons.append(f"model.architecture is {config.model.architecture} (only the LSTM is captured)")
    if world.distributed:
        reasons.append("training is data-parallel (DDP)")
    if config.train.compile or config.train.compile_model:
        reasons.append("train.compile / train.compile_model is set")
    if setting == "auto" and config.model.dropout_mode != "exact" and config.model.dropout > 0:
        reasons.append("model.dropout_mode is fast (auto captures the exact masks only)")
    if reasons:
        if setting == "on":
            raise TiedlmError(f"train.cuda_graph = on, but the step cannot be captured: {reasons[0]}")
        return False, f"eager (train.cuda_graph = auto: {reasons[0]})"
    return True, f"cuda graph (train.cuda_graph = {setting}; {WARMUP_WINDOWS} eager windows first)"


def draw_masks(model: torch.nn.Module, batch: int) -> list[torch.Tensor] | None:
    """The window's masks, exactly as the LSTM's forward would draw them; None when it draws none."""
    config = model.config
    if not model.training or config.dropout <= 0:
        return None
    rows = 1 if config.dropout_mode == "fast" else batch
    weight = model.embedding.weight
    return model.sample_masks(rows, weight.device, weight.dtype)


@dataclass
class StaticBuffers:
    """The tensors a captured step reads: the graph is recorded on these addresses."""

    inputs: torch.Tensor  # (T, B) int64
    targets: torch.Tensor  # (T, B) int64
    state: tuple[torch.Tensor, ...]  # the recurrent state at the window's start
    masks: list[torch.Tensor] | None  # m_0 … m_n, (B, H) (exact) or (1, H) (fast)

    @classmethod
    def like(cls, inputs, targets, state, masks) -> StaticBuffers:
        return cls(
            torch.empty_like(inputs),
            torch.empty_like(targets),
            tuple(torch.empty_like(part) for part in state),
            None if masks is None else [torch.empty_like(mask) for mask in masks],
        )

    def fits(self, inputs: torch.Tensor, targets: torch.Tensor, state) -> bool:
        return (
            inputs.shape == self.inputs.shape
            and targets.shape == self.targets.shape
            and len(state) == len(self.state)
            and all(a.shape == b.shape for a, b in zip(state, self.state, strict=True))
        )

    def load(self, inputs, targets, state, masks) -> None:
        """Copy one window in (on the current stream; no host synchronisation)."""
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        for buffer, part in zip(self.state, state, strict=True):
            buffer.copy_(part)
        if (masks is None) != (self.masks is None):
            raise RuntimeError("the window's masks do not match the captured step's")
        for buffer, mask in zip(self.masks or [], masks or [], strict=True):
            buffer.copy_(mask)


class CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the two calls the step needs (tests put a stand-in here)."""

    def __init__(self, stream):
        self.graph = torch.cuda.CUDAGraph()
        self.stream = stream

    def capture(self, fn):
        with torch.cuda.graph(self.graph, stream=self.stream):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


class CapturedStep:
    """A drop-in for :class:`tiedlm.training.TrainingStep` (same call, same result) that replays a CUDA graph.

    ``step`` must have been built with ``static_shapes=True``. ``capture=None`` captures on a
    CUDA device and runs buffered elsewhere. ``strict`` (``train.cuda_graph = on``) makes a
    failed capture an error; otherwise it is said once and the run goes on eagerly.
    """

    def __init__(
        self,
        step,
        *,
        capture: bool | None = None,
        warmup: int = WARMUP_WINDOWS,
        strict: bool = False,
        graph_factory=CudaGraph,
        say=None,
    ):
        self.step, self.model = step, step.model
        device = next(self.model.parameters()).device
        self.capture = device.type == "cuda" if capture is None else capture
        self.warmup, self.strict = warmup, strict
        self.graph_factory = graph_factory
        self.say = say or (lambda message: print(f"tiedlm: {message}", file=sys.stderr))
        self.stream = torch.cuda.Stream(device) if self.capture and device.type == "cuda" else None
        self.buffers: StaticBuffers | None = None
        self.graph = None
        self.outputs = None  # (stats, new state): the graph's own tensors, rewritten by every replay
        self.grads: list[torch.Tensor | None] | None = None  # the gradients the graph writes
        self.failed: str | None = None
        self.buffered_steps = self.replays = self.eager_steps = 0

    @property
    def augmented(self):
        return self.step.augmented

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def counts(self) -> dict[str, int]:
        """Windows run so far: replayed from the graph, buffered (warm-up), eager (other shapes)."""
        return {"replayed": self.replays, "buffered": self.buffered_steps, "eager": self.eager_steps}

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, state, stop: bool = False):
        other_shape = inputs.size(0) != self.step.bptt or (
            self.buffers is not None and not self.buffers.fits(inputs, targets, state)
        )
        if self.failed is not None or other_shape:
            self.eager_steps += 1  # another shape (the last window of an epoch), or the capture failed
            return self.step(inputs, targets, state, stop)
        masks = draw_masks(self.model, inputs.size(1))
        if self.buffers is None:
            self.buffers = StaticBuffers.like(inputs, targets, state, masks)
        self.buffers.load(inputs, targets, state, masks)
        if self.graph is None and self.capture and self.buffered_steps >= self.warmup:
            self._capture()
        if self.graph is not None:
            for param, grad in zip(self.params, self.grads, strict=True):
                param.grad = grad
            self.graph.replay()
            self.replays += 1
            stats, new_state = self.outputs
            new_state = tuple(part.clone() for part in new_state)  # the next replay rewrites them
        else:
            stats, new_state = self._buffered()
        return self.step.finish(stats, targets.numel(), stop, new_state)

    def _stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        return _SideStream(self.stream)

    def _buffered(self):
        """One window on the static buffers, eagerly (on the capture stream where there is one)."""
        buffers = self.buffers
        self.step.optimizer.zero_grad(set_to_none=True)
        with self._stream():
            stats, new_state = self.step.compute(buffers.inputs, buffers.targets, buffers.state, buffers.masks)
        self.buffered_steps += 1
        return stats, new_state

    def _capture(self) -> None:
        buffers = self.buffers
        self.step.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
        try:
            graph = self.graph_factory(self.stream)
            outputs = graph.capture(
                lambda: self.step.compute(buffers.inputs, buffers.targets, buffers.state, buffers.masks)
            )
        except Exception as error:  # noqa: BLE001 (any failure to capture: say it, go on eagerly)
            self.failed = _one_line(error)
            self.step.optimizer.zero_grad(set_to_none=True)
            if self.strict:
                raise TiedlmError(
                    f"train.cuda_graph = on: the training step could not be captured ({self.failed})"
                ) from error
            self.say(f"warning: the CUDA graph capture failed ({self.failed}); training goes on eagerly")
            return
        self.graph, self.outputs = graph, outputs
        self.grads = [param.grad for param in self.params]


class _SideStream:
    """Run on ``stream`` after the current stream's work, and make the current stream wait for it."""

    def __init__(self, stream):
        self.stream = stream
        self.context = torch.cuda.stream(stream)

    def __enter__(self):
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self.previous = torch.cuda.current_stream(self.stream.device)
        self.context.__enter__()
        return self.stream

    def __exit__(self, *exc):
        self.context.__exit__(*exc)
        self.previous.wait_stream(self.stream)
        return False
