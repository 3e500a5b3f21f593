"""`tiedlm bench`: how fast a configuration trains and evaluates, against the hardware's
measured matmul peak and against a naive reference of the same model.

The naive reference is what a user would write from the paper: ``nn.LSTM`` +
``nn.Linear`` + ``F.cross_entropy`` in fp32, plain (not variational) dropout,
and the augmented loss taken straight from its definition over the whole
(tokens × |V|) matrix; for the RHN it is the micro-step loop written as in
Zilly et al.'s code (separate H and T products, autograd through the loop).
Each architecture names its own (``naive_reference`` in its models/ file; the
Transformer has none). Both run on the same batches in the same process.
Timings are per BPTT window after a warm-up; the reported rate is the median.
The report names the CPU's features (``tiedlm.precision.cpu_features``); the bf16
matmul peak is timed in full only where bf16 is native, and where it is emulated
(e.g. an AVX2-only CPU) on a small product within a fraction of a second, marked
``"bf16": "emulated"``.

FLOPs count the matrix products only (they dominate): per token, forward as the
model's ``forward_flops_per_token`` counts it (LSTM: 2·(4H)(2H) per layer; RHN:
2·(2H)·H for the input and for each of the D micro-steps; + 2H|V| for the decoder), backward = 2 × forward for the
recurrence and decoder; with the augmented loss + 2H|V| per unique target for
ỹ (again in the backward pass when the window's distinct targets exceed one
loss block, so ỹ is recomputed rather than kept) and 2 × that for the gradient into L through ỹ.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from tiedlm.config import Config
from tiedlm.data import Corpus, batchify, bptt_windows, load_corpus
from tiedlm.evaluate import evaluate
from tiedlm.loss import DEFAULT_CHUNK_ELEMENTS
from tiedlm.models import ARCHITECTURES, build_model
from tiedlm.precision import bf16_native, cpu_features
from tiedlm.runtime import frozen_heap, resolve_device
from tiedlm.training import PHASES, TrainingStep, make_optimizer


def matmul_peak_gflops(
    dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 6, budget_s: float | None = None
) -> float:
    """The best GFLOP/s of repeated size×size matrix products in ``dtype``.

    With ``budget_s`` the size is first chosen so that one product takes about budget_s / repeats
    (from a 256² product timed once), and timing stops once the budget is spent: an emulated bf16
    product, ~50x slower than fp32, then costs a fraction of a second instead of minutes.
    """
    if budget_s is not None:
        probe = torch.randn(256, 256, device=device).to(dtype)
        _sync(device)
        start = time.perf_counter()
        torch.mm(probe, probe)
        _sync(device)
        rate = 2 * 256**3 / max(time.perf_counter() - start, 1e-9)  # FLOP/s, pessimistic (cold)
        fitting = int((rate * budget_s / repeats / 2) ** (1 / 3))
        size = max(256, min(size, fitting // 64 * 64))
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best, began = 0.0, time.perf_counter()
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
        if budget_s is not None and time.perf_counter() - began > budget_s:
            break
    return best


EMULATED_BF16_BUDGET_S = 0.3  # what the bench spends timing bf16 products where they are emulated


def matmul_peaks(device: torch.device) -> tuple[dict[str, float], str]:
    """The fp32 and bf16 matmul peaks, and "native" or "emulated" for bf16 (tiedlm.precision.bf16_native).

    Where bf16 is emulated its peak is timed on a small product within EMULATED_BF16_BUDGET_S."""
    native, _ = bf16_native(device)
    peaks = {"fp32": matmul_peak_gflops(torch.float32, device)}
    if native:
        peaks["bf16"] = matmul_peak_gflops(torch.bfloat16, device)
    else:
        peaks["bf16"] = matmul_peak_gflops(torch.bfloat16, device, budget_s=EMULATED_BF16_BUDGET_S)
    return peaks, "native" if native else "emulated"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_flops_per_token(config: Config, vocab_size: int, unique_fraction: float) -> float:
    """Matrix-product FLOPs of one training token (forward + backward), see the module docstring."""
    h, v = config.model.hidden_size, vocab_size
    architecture = ARCHITECTURES[config.model.architecture]
    forward = architecture.forward_flops_per_token(architecture.settings(config.model), v, bptt=config.data.bptt)
    total = 3 * forward
    if config.loss.augmented:
        target_side = unique_fraction * 2 * h * v
        total += target_side
        unique_targets = unique_fraction * config.data.batch_size * config.data.bptt
        if unique_targets > DEFAULT_CHUNK_ELEMENTS // v:  # several unit blocks: ỹ recomputed, not kept
            total += target_side
        if not config.loss.detach_target:
            total += 2 * target_side  # gradient into L through ỹ
    return total


def naive_step(model: nn.Module, optimizer, config: Config, inputs, targets, state):
    """One training step of the reference, the augmented loss from its definition."""
    state = tuple(s.detach() for s in state)
    with record_function(PHASES[0]):
        logits, state = model(inputs, state)
        logits, flat = logits.flatten(0, 1), targets.flatten()
        bias = model.decoder.bias
        loss = F.cross_entropy(logits if bias is None else logits + bias, flat, reduction="sum")
        if config.loss.augmented:
            tau, embedding = config.loss.tau, model.embedding.weight
            target_scores = embedding[flat] @ embedding.t() / tau
            if config.loss.detach_target:
                target_scores = target_scores.detach()
            log_y_tilde = F.log_softmax(target_scores, dim=-1)
            log_y_hat = F.log_softmax(logits / tau, dim=-1)
            kl = (log_y_tilde.exp() * (log_y_tilde - log_y_hat)).sum()
            loss = loss + config.loss.gamma * tau * kl
    with record_function(PHASES[1]):
        optimizer.zero_grad(set_to_none=True)
        (loss / config.data.batch_size).backward()
    with record_function(PHASES[2]):
        if config.train.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.train.clip)
        loss.item()
    with record_function(PHASES[3]):
        optimizer.step()
    return state


@dataclass
class Timing:
    tokens_per_s: float
    window_s: list[float]


def time_windows(run_window, batches, warmup: int, device: torch.device) -> Timing:
    """Per-window seconds after ``warmup`` windows, with the heap frozen as the trainer has it."""
    seconds, tokens = [], batches[0][1].numel()
    with frozen_heap():
        for index, (inputs, targets) in enumerate(batches):
            _sync(device)
            start = time.perf_counter()
            run_window(inputs, targets)
            _sync(device)
            if index >= warmup:
                seconds.append(time.perf_counter() - start)
    return Timing(tokens / statistics.median(seconds), seconds)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass
class Workload:
    """What a speed measurement runs: the first ``warmup + windows`` training windows of the
    config's corpus, the model and its training step (and, on request, the naive reference)."""

    config: Config
    device: torch.device
    corpus: Corpus
    batches: list
    unique_fraction: float
    model: nn.Module
    step: TrainingStep

    @property
    def vocab_size(self) -> int:
        return len(self.corpus.vocab)

    def naive(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(self.config.seed)
        naive_class = ARCHITECTURES[self.config.model.architecture].naive_reference
        model = naive_class(self.config, self.vocab_size).to(self.device).train()
        return model, torch.optim.SGD(model.parameters(), lr=self.config.train.lr)


def workload(config: Config, windows: int, warmup: int) -> Workload:
    device = resolve_device(config.train.device)
    corpus = load_corpus(config.data.corpus)
    source = batchify(corpus.train, config.data.batch_size).to(device)
    batches = [b for _, b in zip(range(warmup + windows), bptt_windows(source, config.data.bptt), strict=False)]
    unique_fraction = statistics.mean(t.unique().numel() / t.numel() for _, t in batches)
    torch.manual_seed(config.seed)
    model = build_model(config.model, len(corpus.vocab)).to(device).train()
    step = TrainingStep(model, make_optimizer(model, config.train), config)
    return Workload(config, device, corpus, batches, unique_fraction, model, step)


def bench(config: Config, windows: int = 20, warmup: int = 3, reference: bool = True) -> dict:
    """Measure training/evaluation speed of ``config`` (and of the naive reference); return a JSON-able dict."""
    work = workload(config, windows, warmup)
    device, corpus, vocab_size, model, step = work.device, work.corpus, work.vocab_size, work.model, work.step
    precision = step.precision  # fp32 or bf16 (``auto`` resolved)
    state = [model.init_state(config.data.batch_size)]

    def train_window(inputs, targets):
        state[0] = step(inputs, targets, state[0]).state

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = time_windows(train_window, work.batches, warmup, device)
    peak_memory = _peak_memory_mb(device)

    eval_tokens = min(corpus.valid.numel(), (warmup + windows) * config.data.bptt * config.data.eval_batch_size)
    eval_ids = corpus.valid[: eval_tokens + 1]
    evaluate(model, eval_ids[: config.data.bptt * config.data.eval_batch_size * warmup + 1],
             config.data.eval_batch_size, config.data.bptt, precision)  # fmt: skip
    _sync(device)
    start = time.perf_counter()
    result = evaluate(model, eval_ids, config.data.eval_batch_size, config.data.bptt, precision)
    _sync(device)
    eval_rate = result.tokens / (time.perf_counter() - start)

    flops = training_flops_per_token(config, vocab_size, work.unique_fraction)
    peaks, bf16 = matmul_peaks(device)
    achieved = flops * train.tokens_per_s / 1e9
    report = {
        "config": config.name,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_features": cpu_features().describe() if device.type == "cpu" else None,
        "bf16": bf16,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "architecture": config.model.architecture,
        "dropout_mode": config.model.dropout_mode,
        "compile": config.train.compile,
        "compile_model": config.train.compile_model,
        "augmented": config.loss.augmented,
        "hidden_size": config.model.hidden_size,
        "vocab_size": vocab_size,
        "batch_size": config.data.batch_size,
        "bptt": config.data.bptt,
        "timed_windows": windows,
        "train_tokens_per_s": train.tokens_per_s,
        "eval_tokens_per_s": eval_rate,
        "eval_batch_size": config.data.eval_batch_size,
        "peak_memory_mb": peak_memory,
        "unique_target_fraction": work.unique_fraction,
        "train_gflop_per_token": flops / 1e9,
        "achieved_gflops": achieved,
        "matmul_peak_gflops": peaks,
        "fraction_of_peak": achieved / peaks[precision],
    }
    if reference and ARCHITECTURES[config.model.architecture].naive_reference is not None:
        naive, optimizer = work.naive()
        naive_state = [naive.init_state(config.data.batch_size)]

        def naive_window(inputs, targets):
            naive_state[0] = naive_step(naive, optimizer, config, inputs, targets, naive_state[0])

        reference_timing = time_windows(naive_window, work.batches, warmup, device)
        report["reference_train_tokens_per_s"] = reference_timing.tokens_per_s
        report["reference"] = type(naive).__name__  # NaiveLSTM, NaiveRHN: each architecture names its own
        report["speedup_over_reference"] = train.tokens_per_s / reference_timing.tokens_per_s
    return report


def format_report(report: dict) -> str:
    device = report["device"] + (f" ({report['cpu_features']})" if report.get("cpu_features") else "")
    lines = [
        f"{report['config']}: {device}, {report['threads']} threads, {report['precision']}, "
        f"VD {report['dropout_mode']}, AL {'on' if report['augmented'] else 'off'}"
        + (", compiled loss" if report.get("compile") else "")
        + (", compiled model" if report.get("compile_model") else ""),
        f"  train      {report['train_tokens_per_s']:>10,.0f} tokens/s  "
        f"({report['achieved_gflops']:.0f} GFLOP/s = {report['fraction_of_peak']:.0%} of the "
        f"{report['precision']} matmul peak {report['matmul_peak_gflops'][report['precision']]:.0f} GFLOP/s)",
        f"  evaluate   {report['eval_tokens_per_s']:>10,.0f} tokens/s  (batch size {report['eval_batch_size']})",
        f"  matmul peak fp32 {report['matmul_peak_gflops']['fp32']:,.0f} GFLOP/s, bf16 "
        f"{report['matmul_peak_gflops']['bf16']:,.0f} GFLOP/s (bf16: {report.get('bf16', 'native')})",
        f"  peak memory {report['peak_memory_mb']:,.0f} MB",
    ]
    if "reference_train_tokens_per_s" in report:
        lines.append(
            f"  reference  {report['reference_train_tokens_per_s']:>10,.0f} tokens/s  "
            f"({report.get('reference', 'naive reference')} + AL by definition, fp32): "
            f"tiedlm is {report['speedup_over_reference']:.2f}x"
        )
    return "\n".join(lines)
