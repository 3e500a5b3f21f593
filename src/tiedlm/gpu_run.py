"""One prepared command for a lent GPU (``scripts/gpu_run.sh``): self-check, the training queue, $OUT.

    bash scripts/gpu_run.sh [--budget-s 540] [--precision auto] [--jobs N] [--only TABLE/VARIANT,...]
    bash scripts/gpu_run.sh --dry-run          the same on the CPU, on a tiny corpus, in seconds

In order, inside ``--budget-s`` seconds from the shell script's start (its install included):

1. **Self-check** (≤ 60 s, a subprocess): a tiny config trained for a few windows by the eager
   fp32 step (unique-target AL, the reference) and by the captured step (static-shape AL, CUDA
   graph), in fp32 and in the run precision; the losses and weights must agree. Then the speed of
   WikiText-2 medium REAL (|V| = 33,278, random Zipf tokens): eager and captured training tok/s,
   evaluation tok/s, and the projected seconds per epoch. Then two captured workers at once, to
   see whether two runs side by side raise the total throughput. The captured step is tried with
   the fused Triton LSTM cell (``TIEDLM_CUDA_CELL=on``, tiedlm/cuda_cell.py), then without it; if
   neither passes, the queue runs eagerly (``train.cuda_graph = off``). The summary says which ran.
2. **The queue**, in order: WikiText-2 medium RE, REAL; PTB medium REAL, RE, AL, VD; PTB large
   REAL, RE; ``--jobs`` at a time (default: 2 where the self-check measured a gain, else 1).
   Each is ``tiedlm train`` into ``WORK/runs/TABLE/VARIANT`` (the layout ``tiedlm reproduce``
   collects) with ``train.time_limit_minutes`` set to the time left, so it stops cleanly after
   an epoch; a run still going at the deadline gets SIGTERM (checkpoint, exit 143). No run is
   started with less than ``MIN_START_S`` left.
3. **$OUT** (at most 8 files of ≤ 16 MiB, rewritten after every run so that a killed command
   still returns them): ``summary.json``; ``logs.tar.gz`` (this driver's log, the self-check,
   every trainer's log); ``runs.tar.gz`` (``runs/TABLE/VARIANT/{metrics.jsonl, run.json,
   config.json, final.json, best/vocab.txt, …}`` and ``runs/TABLE/VARIANT.log``);
   ``results.tar.gz`` (``tiedlm reproduce TABLE --collect-only`` run there: TABLE.md/.json/.png);
   ``ckpt-TABLE-VARIANT.tar`` for the runs whose last checkpoint and best/ fit what is left.

Collect here: ``mkdir DIR && tar xzf runs.tar.gz -C DIR`` then
``tiedlm reproduce wikitext-2-medium --collect-only --runs DIR/runs``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any

from tiedlm import cuda_cell

QUEUE = (
    ("wikitext-2-medium", "re"),
    ("wikitext-2-medium", "real"),
    ("ptb-medium", "real"),
    ("ptb-medium", "re"),
    ("ptb-medium", "al"),
    ("ptb-medium", "vd"),
    ("ptb-large", "real"),
    ("ptb-large", "re"),
)
DEFAULT_BUDGET_S = 540.0  # for a device-tool `run` with timeout_s = 600
PACK_RESERVE_S = 30.0  # the last packing, the collect and the summary
STOP_GRACE_S = 25.0  # SIGTERM → checkpoint → exit, before SIGKILL
RUN_OVERHEAD_S = 25.0  # start-up (CUDA, corpus, capture) + final evaluation, outside train.time_limit
MIN_START_S = 75.0  # no run starts with less than this left before the deadline
SELFCHECK_TIMEOUT_S = 75.0
OUT_FILES, OUT_FILE_BYTES, OUT_TOTAL_BYTES = 8, 16 << 20, 60 << 20
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


class Log:
    """Lines to stdout (the device tool returns its tail) and to WORK/gpu_run.log (returned in logs.tar.gz)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)

    def __call__(self, message: str) -> None:
        line = f"gpu_run: {message}"
        print(line, flush=True)
        self.handle.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        self.handle.flush()


# --- the self-check (runs in its own process) ----------------------------------------------------------


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
    model.mask_generator = torch.Generator(device=device)
    model.mask_generator.manual_seed(config.seed)
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


# --- the driver ------------------------------------------------------------------------------------------


class Driver:
    def __init__(self, args):
        self.args = args
        self.t0 = float(os.environ.get("GPU_RUN_T0") or _now())
        self.deadline = self.t0 + args.budget_s
        self.stop_at = self.deadline - PACK_RESERVE_S - STOP_GRACE_S  # trainers still going get SIGTERM
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.runs = self.work / "runs"
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.say = Log(self.work / "gpu_run.log")
        self.summary: dict[str, Any] = {"dry_run": args.dry_run, "budget_s": args.budget_s, "runs": []}
        self.configs = Path(args.configs).absolute()
        if args.dry_run and args.precision == "auto":
            args.precision = "fp32"  # the dry run checks the plumbing, fast, wherever bf16 is native or not

    def left(self) -> float:
        return self.deadline - _now()

    def main(self) -> int:
        say = self.say
        say(
            f"start; budget {self.args.budget_s:.0f} s from the script's start, {self.left():.0f} s left; "
            f"work {self.work}, out {self.out}"
        )
        self.summary["selfcheck"] = report = self.run_selfcheck()
        self.pack()
        if report.get("device") == "cpu" and not self.args.dry_run:
            say("no CUDA device: the queue is not run (nothing to gain on this machine's CPUs in minutes)")
            self.finish()
            return 1
        mode = "auto" if report.get("captured_ok") else "off"
        cell = report.get("cuda_cell", "off") if mode == "auto" else "off"
        os.environ["TIEDLM_CUDA_CELL"] = cell  # for every process from here on: workers and trainers
        self.summary["cuda_graph"], self.summary["cuda_cell"] = mode, cell
        if mode == "off":
            say(
                "the captured step failed or disagreed with the eager reference: the queue trains EAGERLY "
                "(train.cuda_graph = off)"
            )
        jobs = self.args.jobs or self.choose_jobs(report, mode)
        precision = report.get("precision", self.args.precision)
        self.summary["jobs"] = jobs
        self.pack()
        self.run_queue(jobs, mode, precision)
        self.finish()
        return 0

    # --- self-check and concurrency ---

    def run_selfcheck(self) -> dict[str, Any]:
        path = self.work / "selfcheck.json"
        command = [
            sys.executable,
            "-m",
            "tiedlm.gpu_run",
            "selfcheck",
            "--json",
            str(path),
            "--precision",
            self.args.precision,
            "--configs",
            str(self.configs),
            "--seconds",
            str(self.args.speed_seconds),
        ] + (["--dry-run"] if self.args.dry_run else [])
        began = _now()
        code = self._subprocess(command, self.work / "selfcheck.log", SELFCHECK_TIMEOUT_S)
        report = json.loads(path.read_text()) if path.is_file() else {"captured_ok": False}
        report["exit"] = code
        report["seconds"] = _now() - began
        if code not in (0, 124):  # a crash: no captured step; a timeout keeps what the report says was through
            report["captured_ok"] = False
        for check in report.get("checks", []):
            verdict = "OK" if check["ok"] else "FAILED"
            detail = check.get("error") or (
                f"max rel loss diff {check['max_rel_loss_diff']:.1e}, weights {check['max_rel_weight_diff']:.1e} "
                f"(tolerance {check['tolerance']:.0e}); windows {check['windows']}"
            )
            self.say(f"self-check {check['name']}: {verdict}: {detail}")
        speed = report.get("speed", {})
        for name, measured in speed.items():
            if name == "captured" or not isinstance(measured, dict):
                continue  # "captured" repeats the one chosen
            if "tok_s" in measured:
                rate = f"{measured['tok_s']:.0f} tok/s"
                self.say(f"speed {name} ({report['precision']}, WikiText-2 medium REAL): {rate}")
            else:
                self.say(f"speed {name}: {measured}")
        if "eval_tok_s" in speed:
            self.say(f"speed evaluation: {speed['eval_tok_s']:.0f} tok/s")
        if "projected_wt2_medium_epoch_s" in report:
            self.say(
                f"projected WikiText-2 medium REAL epoch: {report['projected_wt2_medium_epoch_s']:.1f} s "
                f"(40 epochs: {report['projected_40_epochs_min']:.1f} min)"
            )
        self.say(
            f"self-check: exit {code}, {report['seconds']:.0f} s, device {report.get('device_name', '?')}, "
            f"torch {report.get('torch', '?')}; captured step {'OK' if report['captured_ok'] else 'NOT used'}, "
            f"fused cell {report.get('cuda_cell', 'off')}"
        )
        return report

    def choose_jobs(self, report: dict[str, Any], mode: str) -> int:
        """2 where two workers at once train more tokens per second in all than one alone (by ≥ 10%)."""
        single = report.get("speed", {}).get("captured" if mode == "auto" else "eager", {}).get("tok_s")
        if not single:
            return 1
        go = self.work / "speed.go"
        go.unlink(missing_ok=True)
        procs, readies = [], []
        for index in range(2):
            path, ready = self.work / f"speed-{index}.json", self.work / f"speed-{index}.ready"
            path.unlink(missing_ok=True)
            ready.unlink(missing_ok=True)
            readies.append(ready)
            command = [
                sys.executable,
                "-m",
                "tiedlm.gpu_run",
                "speed",
                "--json",
                str(path),
                "--precision",
                report.get("precision", "fp32"),
                "--configs",
                str(self.configs),
                "--seconds",
                str(self.args.speed_seconds),
                "--ready",
                str(ready),
                "--go",
                str(go),
            ]
            if mode == "off":
                command.append("--eager")
            if self.args.dry_run:
                command.append("--dry-run")
            log = open(self.work / f"speed-{index}.log", "w", encoding="utf-8")  # noqa: SIM115
            procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), path, log))
        waited = _now()
        while not all(ready.exists() for ready in readies) and _now() - waited < 45:
            if any(proc.poll() is not None for proc, _, _ in procs):
                break
            time.sleep(0.05)
        go.write_text("go\n")  # both timed at once (or, if one never got ready, whatever ran)
        measured = []
        for proc, path, log in procs:
            try:
                proc.wait(timeout=self.args.speed_seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            if path.is_file():
                measured.append(json.loads(path.read_text()))
        verdict = self.summary["concurrency"] = concurrency_verdict(single, measured)
        rates = verdict["two_at_once_tok_s"]
        self.say(
            f"concurrency: one run {single:.0f} tok/s; two at once {' + '.join(f'{r:.0f}' for r in rates)} = "
            f"{sum(rates):.0f} tok/s ({verdict['gain']:.2f}x, timed {verdict['overlap']:.0%} side by side): "
            f"{verdict['jobs']} at a time"
        )
        return verdict["jobs"]

    def _subprocess(self, command: list[str], log_path: Path, timeout: float) -> int:
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.say(f"{command[3]}: stopped after {timeout:.0f} s")
                return 124

    # --- the queue ---

    def plans(self):
        from tiedlm.reproduce import plan

        wanted = [tuple(item.split("/")) for item in self.args.only.split(",")] if self.args.only else list(QUEUE)
        unknown = [item for item in wanted if item not in QUEUE]
        if unknown:
            raise SystemExit(f"gpu_run: --only: not in the queue: {unknown} (choose from {QUEUE})")
        return [
            plan(table, [variant], self.configs, self.runs)[0] for table, variant in QUEUE if (table, variant) in wanted
        ]

    def overrides(self, mode: str, precision: str) -> list[str]:
        overrides = [f"train.precision={precision}"]
        if mode != "auto":
            overrides.append(f"train.cuda_graph={mode}")
        if self.args.dry_run:
            overrides += [f"data.corpus={self.work / 'corpus'}", *DRY_OVERRIDES]
        return overrides

    def run_queue(self, jobs: int, mode: str, precision: str) -> None:
        from tiedlm.reproduce import train_command

        if self.args.dry_run:
            _write_tiny_corpus(self.work / "corpus")
        pending, running = self.plans(), {}
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        while pending or running:
            while pending and len(running) < jobs:
                item, left = pending[0], self.stop_at - _now()
                if left < (MIN_START_S if not self.args.dry_run else 1.0):
                    for later in pending:
                        self._record(later, "not started", None, 0.0, f"{left:.0f} s were left")
                    pending.clear()
                    break
                pending.pop(0)
                if item.finished:
                    self._record(item, "already finished", 0, 0.0, "")
                    continue
                limit_min = max(left - RUN_OVERHEAD_S, 6.0) / 60 + _elapsed_minutes(item.run_dir)
                command = [
                    sys.executable,
                    "-m",
                    "tiedlm",
                    *train_command(
                        item, [*self.overrides(mode, precision), f"train.time_limit_minutes={limit_min:.3f}"]
                    ),
                ]
                item.run_dir.parent.mkdir(parents=True, exist_ok=True)
                log = open(item.run_dir.parent / f"{item.variant}.log", "a", encoding="utf-8")  # noqa: SIM115
                log.write(f"$ {' '.join(command)}\n")
                log.flush()
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[proc] = {"item": item, "began": _now(), "log": log, "terminated": False}
                self.say(
                    f"{item.table}/{item.variant}: started, time limit {limit_min:.1f} min "
                    f"({self.left():.0f} s left in the budget)"
                )
            now = _now()
            for proc, entry in running.items():
                if now >= self.stop_at and not entry["terminated"]:
                    entry["terminated"] = True
                    self.say(f"{entry['item'].table}/{entry['item'].variant}: deadline: SIGTERM (checkpoint, exit 143)")
                    proc.send_signal(signal.SIGTERM)
                elif now >= self.stop_at + STOP_GRACE_S and proc.poll() is None:
                    proc.kill()
            for proc in [p for p in running if p.poll() is not None]:
                entry = running.pop(proc)
                item, began, log = entry["item"], entry["began"], entry["log"]
                log.close()
                self._record(item, "exit", proc.returncode, _now() - began, "")
                self.pack()
            time.sleep(0.2)

    def _record(self, item, status: str, code: int | None, seconds: float, note: str) -> None:
        row = {"table": item.table, "variant": item.variant, "status": status, "exit": code, "wall_s": seconds}
        if note:
            row["note"] = note
        row.update(_run_facts(item.run_dir))
        self.summary["runs"].append(row)
        if status == "exit":
            epochs = row.get("epochs", 0)
            result = (
                f"valid {row['valid_ppl']:.2f}, test {row['test_ppl']:.2f}, stopped by {row['stopped_by']}"
                if "valid_ppl" in row
                else "no final.json"
            )
            self.say(
                f"{item.table}/{item.variant}: exit {code} after {seconds:.0f} s, {epochs} epochs, {result}; "
                f"epoch {row.get('epoch_s', 0):.1f} s; windows {row.get('windows')}"
            )
        else:
            self.say(f"{item.table}/{item.variant}: {status}{f' ({note})' if note else ''}")

    # --- $OUT ---

    def collect_tables(self) -> None:
        """``tiedlm reproduce TABLE --collect-only`` for every table that has a run, into WORK/results."""
        from tiedlm.cli import main as tiedlm

        tables = sorted({row["table"] for row in self.summary["runs"] if row.get("epochs")})
        for table in tables:
            variants = [r["variant"] for r in self.summary["runs"] if r["table"] == table and r.get("epochs")]
            argv = [
                "reproduce",
                table,
                "--collect-only",
                "--runs",
                str(self.runs),
                "--results",
                str(self.work / "results"),
                "--configs",
                str(self.configs),
                "--variants",
                ",".join(variants),
            ]
            with open(self.work / f"collect-{table}.log", "w", encoding="utf-8") as log:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    try:
                        code = tiedlm(argv)
                    except Exception:  # noqa: BLE001 (the runs come back all the same)
                        traceback.print_exc()
                        code = 1
            self.summary.setdefault("collect", {})[table] = code
            self.say(f"collect {table}: {'ok' if code == 0 else f'failed (exit {code}), see collect-{table}.log'}")

    def pack(self, final: bool = False) -> None:
        try:
            files = pack_out(self.work, self.runs, self.out, self.summary, checkpoints=final)
            self.summary["out_files"] = files
        except Exception as error:  # noqa: BLE001 (never lose the run over the packing)
            self.say(f"packing failed: {_error_line(error)}")
            traceback.print_exc()

    def finish(self) -> None:
        self.collect_tables()
        self.summary["seconds"] = _now() - self.t0
        self.pack(final=True)
        self.pack(final=True)  # again, so that summary.json lists the files
        self.say(f"done in {self.summary['seconds']:.0f} s; $OUT: {', '.join(self.summary.get('out_files', []))}")
        for line in summary_table(self.summary):
            print(line)
        print(
            "collect: mkdir DIR && tar xzf runs.tar.gz -C DIR && "
            "tiedlm reproduce wikitext-2-medium --collect-only --runs DIR/runs"
        )


def concurrency_verdict(single: float, measured: list[dict[str, Any]]) -> dict[str, Any]:
    """Two runs at once where two workers timed side by side (≥ 80% of the time) trained ≥ 10% more
    tokens per second in all than one alone; else one at a time."""
    rates = [m["tok_s"] for m in measured]
    overlap = 0.0
    if len(measured) == 2:
        (a0, a1), (b0, b1) = ((m["start_wall"], m["end_wall"]) for m in measured)
        overlap = max(0.0, min(a1, b1) - max(a0, b0)) / max(a1 - a0, b1 - b0, 1e-9)
    gain = sum(rates) / single if len(rates) == 2 and single > 0 else 0.0
    jobs = 2 if gain >= 1.1 and overlap >= 0.8 else 1
    return {"single_tok_s": single, "two_at_once_tok_s": rates, "gain": gain, "overlap": overlap, "jobs": jobs}


def _elapsed_minutes(run_dir: Path) -> float:
    """Training minutes a run folder already holds (train.time_limit counts them too)."""
    from tiedlm.run_folder import RunFolder

    with contextlib.suppress(KeyError, IndexError):
        return RunFolder(run_dir).records()[-1]["elapsed_s"] / 60
    return 0.0


def _run_facts(run_dir: Path) -> dict[str, Any]:
    from tiedlm.run_folder import RunFolder

    facts: dict[str, Any] = {}
    folder = RunFolder(run_dir)
    if folder.metrics.is_file():
        records = folder.records()
        if records:
            facts["epochs"] = records[-1].get("epoch", 0)
            facts["best_valid_so_far"] = min(r.get("valid_ppl", float("inf")) for r in records)
            later = records[1:] or records  # the first epoch holds the start-up and the capture
            facts["epoch_s"] = sum(r.get("epoch_s", 0.0) for r in later) / len(later)
            facts["train_tokens_per_s"] = records[-1].get("train_tokens_per_s")
            facts["windows"] = records[-1].get("windows")
    if folder.final.is_file():
        with contextlib.suppress(ValueError):
            report = json.loads(folder.final.read_text(encoding="utf-8"))
            facts.update({key: report.get(key) for key in ("valid_ppl", "test_ppl", "stopped_by", "best_epoch")})
    if folder.run_info.is_file():
        with contextlib.suppress(ValueError):
            run = json.loads(folder.run_info.read_text(encoding="utf-8"))
            facts.update({key: run.get(key) for key in ("training_step", "precision", "device_name")})
    return facts


SMALL_RUN_FILES = ("metrics.jsonl", "run.json", "config.json", "final.json")
TARS = ("logs.tar.gz", "runs.tar.gz", "results.tar.gz")
SMALL_BEST_FILES = ("vocab.txt", "config.json", "trainer_state.json")


def _tar_bytes(entries: list[tuple[Path, str]], compress: bool) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as tar:
        for path, name in entries:
            tar.add(path, arcname=name)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def pack_out(work: Path, runs: Path, out: Path, summary: dict[str, Any], checkpoints: bool) -> list[str]:
    """Write $OUT: summary.json, logs.tar.gz, runs.tar.gz, results.tar.gz and, with ``checkpoints``,
    ckpt-TABLE-VARIANT.tar while they fit (OUT_FILES files, OUT_FILE_BYTES each, OUT_TOTAL_BYTES in all)."""
    written: dict[str, int] = {}

    def put(name: str, data: bytes) -> bool:
        if len(data) > OUT_FILE_BYTES or len(written) >= OUT_FILES - 1:  # one slot kept for summary.json
            return False
        if sum(written.values()) + len(data) > OUT_TOTAL_BYTES:
            return False
        _write_atomic(out / name, data)
        written[name] = len(data)
        return True

    logs = [(path, f"logs/{path.name}") for path in sorted(work.glob("*.log")) + sorted(work.glob("*.json"))]
    logs += [(path, f"logs/{path.parent.name}-{path.name}") for path in sorted(runs.glob("*/*.log"))]
    put("logs.tar.gz", _tar_bytes(logs, compress=True))
    small = []
    for log in sorted(runs.glob("*/*.log")):
        small.append((log, f"runs/{log.parent.name}/{log.name}"))
    for run_dir in sorted(path for path in runs.glob("*/*") if path.is_dir()):
        name = f"runs/{run_dir.parent.name}/{run_dir.name}"
        small += [(run_dir / f, f"{name}/{f}") for f in SMALL_RUN_FILES if (run_dir / f).is_file()]
        small += [
            (run_dir / "best" / f, f"{name}/best/{f}") for f in SMALL_BEST_FILES if (run_dir / "best" / f).is_file()
        ]
    if small:
        put("runs.tar.gz", _tar_bytes(small, compress=True))
    results = work / "results"
    if results.is_dir():
        put("results.tar.gz", _tar_bytes([(results, "results")], compress=True))
    notes = []
    if checkpoints:
        for run_dir in sorted(path for path in runs.glob("*/*") if path.is_dir()):
            kept = sorted((run_dir / "checkpoints").glob("epoch-*"))
            parts = [path for path in (kept[-1:] + [run_dir / "best"]) if path.is_dir()]
            if not parts:
                continue
            name = f"runs/{run_dir.parent.name}/{run_dir.name}"
            entries = [(part, f"{name}/{part.relative_to(run_dir)}") for part in parts]
            size = sum(f.stat().st_size for part in parts for f in part.iterdir())
            label = f"ckpt-{run_dir.parent.name}-{run_dir.name}.tar"
            if size > OUT_FILE_BYTES or not put(label, _tar_bytes(entries, compress=False)):
                notes.append(f"{name}: checkpoint not returned ({size / 2**20:.0f} MiB does not fit)")
    summary["checkpoint_notes"] = notes
    _write_atomic(out / "summary.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    for stale in out.glob("*.tar*"):  # written by an earlier pack, not this one (a checkpoint that no longer fits)
        if stale.name not in written and (stale.name.startswith("ckpt-") or stale.name in TARS):
            stale.unlink()
    return sorted([*written, "summary.json"])


def summary_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| run | status | epochs | valid | test | stopped by | s/epoch | tok/s | windows (replayed/buffered/eager) |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in summary["runs"]:
        windows = row.get("windows") or {}
        counts = "/".join(str(windows.get(k, "-")) for k in ("replayed", "buffered", "eager")) if windows else "-"
        valid = f"{row['valid_ppl']:.2f}" if row.get("valid_ppl") else "-"
        test = f"{row['test_ppl']:.2f}" if row.get("test_ppl") else "-"
        rate = f"{row['train_tokens_per_s']:.0f}" if row.get("train_tokens_per_s") else "-"
        lines.append(
            f"| {row['table']}/{row['variant']} | {row['status']} {row.get('exit', '')} | {row.get('epochs', 0)} "
            f"| {valid} | {test} | {row.get('stopped_by') or '-'} | {row.get('epoch_s', 0):.1f} | {rate} | {counts} |"
        )
    for note in summary.get("checkpoint_notes", []):
        lines.append(f"- {note}")
    return lines


def _write_tiny_corpus(root: Path, words: int = 1200, vocab: int = 30, seed: int = 0) -> None:
    """A small patterned corpus with <unk> (the dry run's data)."""
    rng = random.Random(seed)
    lexicon = [f"w{i}" for i in range(vocab)] + ["<unk>"]

    def text(n: int) -> str:
        lines, line = [], []
        for _ in range(n):
            line.append(lexicon[(len(line) * 3 + rng.randrange(3)) % len(lexicon)])
            if len(line) >= rng.randrange(4, 12):
                lines.append(" ".join(line))
                line = []
        return "\n".join(lines + [" ".join(line)]) + "\n"

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(text(words) + " ".join(lexicon) + "\n")
    (root / "valid.txt").write_text(text(words // 5))
    (root / "test.txt").write_text(text(words // 5))


# --- command line --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tiedlm.gpu_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "selfcheck", "speed"))
    parser.add_argument("--dry-run", action="store_true", help="everything on the CPU, on a tiny corpus")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds from the script's start to the last file written",
    )
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--jobs", type=int, default=0, help="runs at once (default: from the self-check)")
    parser.add_argument("--only", default="", help="comma-separated TABLE/VARIANT of the queue to train")
    parser.add_argument("--work", default=os.environ.get("GPU_RUN_WORK", "/tmp/gpu-run"))
    parser.add_argument("--out", default=os.environ.get("OUT", ""))
    parser.add_argument("--configs", default="configs")
    parser.add_argument("--speed-seconds", "--seconds", dest="speed_seconds", type=float, default=3.0)
    parser.add_argument("--json", help="selfcheck/speed: write the report here")
    parser.add_argument("--ready", help="speed: write this file when warmed up ...")
    parser.add_argument("--go", help="speed: ... and start timing once this file exists")
    parser.add_argument("--eager", action="store_true", help="speed: time the eager step")
    return parser


def _save_json(path: str | None, report: dict[str, Any]) -> None:
    if path:
        _write_atomic(Path(path), (json.dumps(report, indent=2, default=str) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.mode in ("selfcheck", "speed"):
        if args.mode == "selfcheck":
            report = selfcheck(args, save=lambda report: _save_json(args.json, report))
        else:
            from tiedlm.precision import resolve_precision

            device = _device(args.dry_run)
            report = measure_speed(
                Path(args.configs) / SPEED_CONFIG,
                device,
                resolve_precision(args.precision, device)[0],
                not args.eager,
                args.speed_seconds,
                dry_run=args.dry_run,
                ready=Path(args.ready) if args.ready else None,
                go=Path(args.go) if args.go else None,
            )
        _save_json(args.json, report)
        print(json.dumps(report, indent=2, default=str))
        return 0
    if not args.out:
        args.out = str(Path(args.work) / "out")
    return Driver(args).main()


if __name__ == "__main__":
    sys.exit(main())
