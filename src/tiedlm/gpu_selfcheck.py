"""The self-check of scripts/gpu_run.sh (``python -m tiedlm.gpu_run selfcheck``, in its own process).

A tiny config trained for a few windows by the eager fp32 step (unique-target AL, the
reference) and by the captured step (static-shape AL, CUDA graph), in fp32 and in the run
precision: the losses and weights must agree (:func:`correctness_check`). Then the speed of
WikiText-2 medium REAL (:func:`measure_speed`, :func:`measure_eval`). tiedlm/gpu_run.py runs it
and reads its report.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from tiedlm import cuda_cell

TRAIN_TOKENS = {"ptb": 929_589, "wikitext-2": 2_088_628}  # tokens per epoch, <eos> included
VALID_TOKENS = {"ptb": 73_760, "wikitext-2": 217_646}
SPEED_CONFIG = "wikitext-2/medium-real.toml"
SPEED_VOCAB = 33_278
# The dry run: every config shrunk to this, on a tiny corpus, on the CPU.
DRY_OVERRIDES = (
    "model.hidden_size=16",
    "data.batch_size=4",
    "data.bptt=6",
    "data.eval_batch_size=2",
    "train.max_epochs=2",
    "train.device=cpu",
    "train.tensorboard=false",
    "train.lr_decay_start=1",
)


def _now() -> float:
    return time.time()


def _device(dry_run: bool):
    import torch

    return torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tiny_config(device, precision: str, static: bool):
    from tiedlm.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig

    return Config(
        seed=3,
        data=DataConfig(batch_size=4, bptt=8),
        model=ModelConfig(
            hidden_size=24, num_layers=2, dropout=0.4, tie_weights=True, output_bias="on", init_range=0.5
        ),
        loss=LossConfig(augmented=True, tau=2.0, gamma=0.5, detach_target=False),  # a KL far from 0
        train=TrainConfig(clip=0.25, device=device.type, precision=precision),
    )


def _build(config, vocab: int, device, precision: str, captured: bool):
    """A model, its mask generator, optimizer and training step, the same for the same config."""
    import torch

    from tiedlm.cuda_graph import CapturedStep
    from tiedlm.models import build_model
    from tiedlm.training import TrainingStep, make_optimizer

    torch.manual_seed(config.seed)
    model = build_model(config.model, vocab).to(device)
    masks = torch.Generator(device=device)
    masks.manual_seed(config.seed)
    model.use_masks(masks)
    model.train()
    optimizer = make_optimizer(model, config.train)
    step = TrainingStep(model, optimizer, config, precision=precision, static_shapes=captured)
    if captured:
        step = CapturedStep(step, strict=True)
    return model, step


def _zipf_tokens(count: int, vocab: int, device, seed: int):
    """Token ids with a Zipf-like frequency (about the share of unique targets of real text)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, count, replacement=True, generator=generator).to(device)


def _windows(config, vocab: int, device, count: int, seed: int, tail: int = 0):
    from tiedlm.data import batchify, bptt_windows

    bptt, batch = config.data.bptt, config.data.batch_size
    source = batchify(_zipf_tokens((bptt * count + tail + 1) * batch, vocab, device, seed), batch)
    return list(bptt_windows(source, bptt))


def _train_windows(model, step, windows) -> list[tuple[float, float]]:
    state, losses = model.init_state(windows[0][0].size(1)), []
    for inputs, targets in windows:
        result = step(inputs, targets, state)
        state = result.state if result.finite else model.init_state(inputs.size(1))
        losses.append((result.ce, result.kl))
    return losses


def correctness_check(
    device, precision: str, reference_precision: str, tolerance: float, cell: str = "off"
) -> dict[str, Any]:
    """The captured step (static AL; the fused cell unless ``cell`` is off) in ``precision`` against the
    eager step (unique AL, torch-ops recurrence) in ``reference_precision``."""
    import torch

    vocab = 97
    config = _tiny_config(device, precision, True)
    full = _windows(config, vocab, device, count=8, seed=5)
    tail = _windows(config, vocab, device, count=1, seed=6, tail=3)[-1]
    windows = full[:5] + [tail] + full[5:]  # a shorter window in between runs eagerly, then the replays go on
    ref_model, ref_step = _build(
        _tiny_config(device, reference_precision, False), vocab, device, reference_precision, captured=False
    )
    model, step = _build(config, vocab, device, precision, captured=True)
    with _cell("off"):
        reference = _train_windows(ref_model, ref_step, windows)
    with _cell(cell):
        got = _train_windows(model, step, windows)
    # The KL is a small difference of large sums: its error is measured against the window's CE as well.
    loss_diff = max(
        max(abs(ce - ce_ref), abs(kl - kl_ref)) / max(abs(ce_ref), 1e-12)
        for (ce, kl), (ce_ref, kl_ref) in zip(got, reference, strict=True)
    )
    weight_diff = max(
        ((p - q).norm() / q.norm().clamp_min(1e-12)).item()
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True)
    )
    finite = all(torch.isfinite(p).all().item() for p in model.parameters())
    ok = finite and loss_diff <= tolerance and weight_diff <= tolerance
    return {
        "name": f"captured {precision} (cell {cell}) vs eager {reference_precision}",
        "ok": ok,
        "max_rel_loss_diff": loss_diff,
        "kl_per_token": reference[0][1] / windows[0][1].numel(),
        "max_rel_weight_diff": weight_diff,
        "tolerance": tolerance,
        "windows": step.counts(),
        "capture_failed": step.failed,
    }


def measure_speed(
    config_path: Path,
    device,
    precision: str,
    captured: bool,
    seconds: float,
    *,
    dry_run: bool,
    ready: Path | None = None,
    go: Path | None = None,
) -> dict[str, Any]:
    """Training tok/s of a config on random Zipf tokens, timed over ``seconds`` after a warm-up.

    With ``ready`` and ``go`` (two workers at once): write ``ready`` after the warm-up, wait for ``go``."""
    from tiedlm.config import load_config

    overrides = list(DRY_OVERRIDES) if dry_run else []
    config = load_config(config_path, overrides + [f"train.precision={precision}"])
    vocab = 40 if dry_run else SPEED_VOCAB
    model, step = _build(config, vocab, device, precision, captured)
    windows = _windows(config, vocab, device, count=64, seed=7)
    state = model.init_state(config.data.batch_size)
    warmup = 6 if captured else 2  # the captured step: 3 buffered windows, the capture, replays
    for inputs, targets in windows[:warmup]:
        state = step(inputs, targets, state).state
    _sync(device)
    if ready is not None and go is not None:
        ready.write_text("ready\n")
        waited = time.perf_counter()
        while not go.exists() and time.perf_counter() - waited < 60:
            time.sleep(0.01)
    start_wall = _now()
    began, count = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        inputs, targets = windows[count % len(windows)]
        result = step(inputs, targets, state)
        state = result.state if result.finite else model.init_state(config.data.batch_size)
        count += 1
    _sync(device)
    elapsed = time.perf_counter() - began
    tokens = count * config.data.bptt * config.data.batch_size
    report = {
        "captured": captured,
        "precision": precision,
        "windows": count,
        "seconds": elapsed,
        "tok_s": tokens / elapsed,
        "start_wall": start_wall,
        "end_wall": _now(),
    }
    if captured:
        report["counts"] = step.counts()
        report["capture_failed"] = step.failed
    return report


def measure_eval(config_path: Path, device, precision: str, seconds: float, *, dry_run: bool) -> float:
    """Evaluation tok/s (the fused kernel, eval batch size of the config) on random tokens."""
    from tiedlm.config import load_config
    from tiedlm.evaluate import evaluate
    from tiedlm.models import build_model

    config = load_config(config_path, (list(DRY_OVERRIDES) if dry_run else []) + [f"train.precision={precision}"])
    vocab = 40 if dry_run else SPEED_VOCAB
    model = build_model(config.model, vocab).to(device)
    ids = _zipf_tokens(config.data.eval_batch_size * config.data.bptt * 20 + 1, vocab, device, seed=9)
    evaluate(model, ids, config.data.eval_batch_size, config.data.bptt, precision)  # warm-up
    began, tokens = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        tokens += evaluate(model, ids, config.data.eval_batch_size, config.data.bptt, precision).tokens
    return tokens / (time.perf_counter() - began)


def selfcheck(args, save=lambda report: None) -> dict[str, Any]:
    """The checks and speeds; ``save(report)`` after each stage, so that a timeout keeps what was done."""
    import torch

    from tiedlm.precision import resolve_precision

    device = _device(args.dry_run)
    precision = resolve_precision(args.precision, device)[0]
    configs = Path(args.configs)
    report: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": precision,
        "tf32_matmul": device.type == "cuda" and _tf32(),
        "checks": [],
    }
    fp32_tolerance = 2e-3 if report["tf32_matmul"] else 1e-4
    checks = [("fp32", "fp32", fp32_tolerance)]
    if precision != "fp32":
        checks.append((precision, precision, 2e-2))
    report["captured_ok"] = False  # until the checks and the captured speed run are through
    report["cuda_cell"] = "off"
    save(report)
    # The captured step with the fused Triton cell, else without it; the reference is always the
    # eager step with the torch-ops recurrence and the unique-target loss.
    with _cell("on"):
        cell_modes = ["on", "off"] if cuda_cell.status(device.type) == "fused Triton cell" else ["off"]
    speed_config = configs / SPEED_CONFIG
    report["speed"] = speeds = {}
    with _cell("off"):
        speeds["eager"] = _speed_or_error(speed_config, device, precision, False, args)
    save(report)
    for cell in cell_modes:
        results = []
        for candidate, reference, tolerance in checks:
            try:
                result = correctness_check(device, candidate, reference, tolerance, cell)
            except Exception as error:  # noqa: BLE001 (report it; the driver falls back)
                result = {"name": f"captured {candidate}", "ok": False, "error": _error_line(error)}
            result["cuda_cell"] = cell
            results.append(result)
            report["checks"].append(result)
            save(report)
        if not all(result["ok"] for result in results):
            continue
        with _cell(cell):
            speeds[f"captured, cell {cell}"] = captured = _speed_or_error(speed_config, device, precision, True, args)
        save(report)
        if "tok_s" in captured:
            speeds["captured"] = captured
            report["captured_ok"], report["cuda_cell"] = True, cell
            break
    if report["captured_ok"] and report["cuda_cell"] == "on":  # what the cell alone gains, for the record
        with _cell("off"):
            speeds["captured, cell off"] = _speed_or_error(speed_config, device, precision, True, args)
    save(report)
    try:
        speeds["eval_tok_s"] = measure_eval(
            speed_config, device, precision, args.speed_seconds / 2, dry_run=args.dry_run
        )
    except Exception as error:  # noqa: BLE001
        speeds["eval_error"] = _error_line(error)
    best = speeds.get("captured" if report["captured_ok"] else "eager", {})
    if "tok_s" in best and "eval_tok_s" in speeds and not args.dry_run:
        corpus = "wikitext-2"
        epoch_s = TRAIN_TOKENS[corpus] / best["tok_s"] + VALID_TOKENS[corpus] / speeds["eval_tok_s"]
        report["projected_wt2_medium_epoch_s"] = epoch_s
        report["projected_40_epochs_min"] = 40 * epoch_s / 60
    save(report)
    return report


@contextlib.contextmanager
def _cell(mode: str):
    """TIEDLM_CUDA_CELL set to ``mode`` inside (tiedlm.cuda_cell reads it at every call)."""
    previous = os.environ.get("TIEDLM_CUDA_CELL")
    os.environ["TIEDLM_CUDA_CELL"] = mode
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TIEDLM_CUDA_CELL"]
        else:
            os.environ["TIEDLM_CUDA_CELL"] = previous


def _speed_or_error(config_path: Path, device, precision: str, captured: bool, args) -> dict[str, Any]:
    try:
        return measure_speed(config_path, device, precision, captured, args.speed_seconds, dry_run=args.dry_run)
    except Exception as error:  # noqa: BLE001
        return {"error": _error_line(error)}


def _tf32() -> bool:
    import torch

    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:  # noqa: BLE001 (an API that moved: assume the stricter tolerance does not apply)
        return False


def _error_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__
