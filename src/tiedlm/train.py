"""The training loop (SPEC §4): SGD, the lr schedule, global-norm clipping,
early stopping on validation perplexity, and a checkpoint every epoch.

The objective of one window is the per-token loss summed over time and
averaged over the batch, Σ_t Σ_b J_tb / B, which is what lr = 1 assumes
(Zaremba et al.); J is cross-entropy, plus γ·τ·KL with the augmented loss.

    RUN/
      run.json             command, commit, torch version, device, start time
      config.json          the resolved config
      metrics.jsonl        one JSON object per epoch
      checkpoints/epoch-NNNN/   the last two epochs (resume from here)
      best/                the best epoch by validation perplexity
      final.json           valid/test perplexity of best/ when training ends
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from tqdm import tqdm

from tiedlm.checkpoint import (
    MODEL_FILE,
    epoch_checkpoints,
    load_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from tiedlm.config import Config, TrainConfig
from tiedlm.data import batchify, bptt_windows, detach_state, load_corpus, num_windows
from tiedlm.errors import TiedlmError
from tiedlm.evaluate import evaluate, perplexity
from tiedlm.loss import AugmentedLoss, cross_entropy
from tiedlm.models import build_model

KEEP_EPOCH_CHECKPOINTS = 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TiedlmError(f"train.device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TiedlmError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """lr of 1-based ``epoch``: constant, then ×lr_decay per epoch from epoch lr_decay_start on."""
    return config.lr * config.lr_decay ** max(0, epoch - config.lr_decay_start + 1)


@dataclass
class Progress:
    """What the trainer must remember between epochs; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    best_valid_ppl: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one
    elapsed_s: float = 0.0  # training + validation wall time so far

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_run_dir(run_dir: Path) -> None:
    """Create a fresh run folder; refuse one that already holds a run, and an unwritable one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TiedlmError(f"--out {run_dir}: exists and is not a directory")
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        raise TiedlmError(
            f"--out {run_dir}: already holds a run; continue it with --resume {run_dir} or pick another --out"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise TiedlmError(f"--out {run_dir}: not writable ({exc.strerror})") from None


def _rng_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state(), "rng.masks": model.mask_generator.get_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def _restore_rng(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    model.mask_generator.set_state(tensors["rng.masks"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _link_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` a copy of checkpoint ``source`` (hard links: files are never rewritten in place)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for child in source.iterdir():
        try:
            os.link(child, tmp / child.name)
        except OSError:
            shutil.copy2(child, tmp / child.name)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


def _check_resume_config(saved: Config, given: Config) -> None:
    for section in ("data", "model"):
        a, b = getattr(saved, section).__dict__, getattr(given, section).__dict__
        changed = [k for k in a if a[k] != b[k]]
        if changed:
            key = f"{section}.{changed[0]}"
            raise TiedlmError(
                f"--resume: {key} is {b[changed[0]]!r} in the config but {a[changed[0]]!r} in the checkpoint"
            )


class Trainer:
    """Trains one configuration into one run folder."""

    def __init__(self, config: Config, run_dir: Path, *, resume: Path | None = None, echo=print):
        self.run_dir, self.echo = Path(run_dir), echo
        self.device = resolve_device(config.train.device)
        if resume is not None:
            checkpoint = load_checkpoint(resume, self.device, prefer="latest")
            if not checkpoint.trainer_state:
                raise TiedlmError(
                    f"--resume {resume}: {checkpoint.path} has no trainer state (not a training checkpoint)"
                )
            _check_resume_config(checkpoint.config, config)
            self.corpus = load_corpus(config.data.corpus, vocab=checkpoint.vocab)
            self.model = checkpoint.model
            try:
                self.progress = Progress(**checkpoint.trainer_state["progress"])
            except (KeyError, TypeError):
                raise TiedlmError(
                    f"--resume {resume}: {checkpoint.path / 'trainer_state.json'} is incomplete"
                ) from None
        else:
            self.corpus = load_corpus(config.data.corpus)
            prepare_run_dir(self.run_dir)
            torch.manual_seed(config.seed)
            self.model = build_model(config.model, len(self.corpus.vocab)).to(self.device)
            self.progress = Progress()
        self.config = config
        self.model.mask_generator = torch.Generator(device=self.device)
        self.model.mask_generator.manual_seed(config.seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.train.lr)
        loss = config.loss
        self.augmented = AugmentedLoss(loss.tau, loss.gamma, loss.detach_target) if loss.augmented else None
        if resume is not None:
            try:
                self.optimizer.load_state_dict(checkpoint.trainer_state["optimizer"])
                _restore_rng(self.model, checkpoint.trainer_tensors)
            except (KeyError, ValueError, RuntimeError):
                raise TiedlmError(f"--resume {resume}: the trainer state in {checkpoint.path} is incomplete") from None
            self._truncate_metrics(self.progress.epoch)
            self._record_resume()
            print(f"resuming {self.run_dir} after epoch {self.progress.epoch} from {checkpoint.path}", file=sys.stderr)
        else:
            self._write_run_info()

    def _write_run_info(self) -> None:
        info = {
            "command": sys.argv,
            "commit": _git_commit(),
            "torch": torch.__version__,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_text_atomic(self.run_dir / "run.json", json.dumps(info, indent=2) + "\n")
        write_text_atomic(self.run_dir / "config.json", json.dumps(self.config.to_dict(), indent=2) + "\n")

    def _record_resume(self) -> None:
        path = self.run_dir / "run.json"
        info = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        info.setdefault("resumed", []).append(
            {
                "after_epoch": self.progress.epoch,
                "command": sys.argv,
                "commit": _git_commit(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        write_text_atomic(path, json.dumps(info, indent=2) + "\n")

    def _truncate_metrics(self, epoch: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epoch]
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _log_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.echo(line)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split; returns its mean cross-entropy, KL and token count."""
        config, model = self.config, self.model
        model.train()
        source = batchify(self.corpus.train, config.data.batch_size).to(self.device)
        windows = num_windows(source, config.data.bptt)
        if config.train.max_steps_per_epoch:
            windows = min(windows, config.train.max_steps_per_epoch)
        state = model.init_state(config.data.batch_size)
        totals = torch.zeros(3, dtype=torch.float64)  # cross-entropy, KL, tokens
        bar = tqdm(
            total=windows * config.data.bptt * config.data.batch_size,
            desc=f"epoch {epoch}",
            unit="tok",
            unit_scale=True,
            disable=None,
            leave=False,
            dynamic_ncols=True,
        )
        for step, (inputs, targets) in enumerate(bptt_windows(source, config.data.bptt)):
            if step == windows:
                break
            state = detach_state(state)
            ce, kl, state = self.window_loss(inputs, targets, state)
            objective = ce.sum() if kl is None else ce.sum() + self.augmented.gamma * self.augmented.tau * kl.sum()
            self.optimizer.zero_grad(set_to_none=True)
            (objective / config.data.batch_size).backward()  # summed over time, averaged over the batch
            if config.train.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip)
            self.optimizer.step()
            totals += torch.tensor(
                [ce.sum().item(), 0.0 if kl is None else kl.sum().item(), targets.numel()], dtype=torch.float64
            )
            bar.update(targets.numel())
            if step % 10 == 0:
                bar.set_postfix(ppl=f"{perplexity(totals[0] / totals[2]):.1f}", refresh=False)
        bar.close()
        tokens = totals[2].item()
        return {"ce": totals[0].item() / tokens, "kl": totals[1].item() / tokens, "tokens": tokens}

    def window_loss(self, inputs, targets, state):
        """Per-token cross-entropy (and KL with the augmented loss) of one window."""
        model = self.model
        flat_targets = targets.flatten()
        if self.augmented is None:
            logits, state = model(inputs, state)
            return cross_entropy(logits.flatten(0, 1), flat_targets), None, state
        logits, state = model(inputs, state, include_bias=False)  # AL needs the bias-free W·h
        ce, kl = self.augmented.components(
            logits.flatten(0, 1), flat_targets, model.embedding.weight, model.output_bias
        )
        return ce, kl, state

    def save(self, epoch: int, improved: bool) -> None:
        trainer_state = {
            "progress": self.progress.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            # Checkpoints are written at epoch ends: training continues at the first
            # window of the next epoch with a zero state.
            "data_position": {"epoch": epoch + 1, "window": 0},
        }
        folder = self.run_dir / "checkpoints" / f"epoch-{epoch:04d}"
        save_checkpoint(folder, self.model, self.config, self.corpus.vocab, trainer_state, _rng_tensors(self.model))
        if improved:
            _link_checkpoint(folder, self.run_dir / "best")
        for old in epoch_checkpoints(self.run_dir)[:-KEEP_EPOCH_CHECKPOINTS]:
            shutil.rmtree(old)

    def fit(self) -> dict[str, Any]:
        """Train until max_epochs or early stopping, then report best/ on valid and test."""
        config, progress = self.config, self.progress
        while progress.epoch < config.train.max_epochs and progress.bad_epochs < config.train.patience:
            epoch = progress.epoch + 1
            lr = learning_rate(config.train, epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            stats = self.train_epoch(epoch)
            train_s = time.perf_counter() - start
            valid = evaluate(self.model, self.corpus.valid, config.data.eval_batch_size, config.data.bptt)
            epoch_s = time.perf_counter() - start
            improved = valid.perplexity < progress.best_valid_ppl
            progress.epoch = epoch
            progress.elapsed_s += epoch_s
            if improved:
                progress.best_valid_ppl, progress.best_epoch, progress.bad_epochs = valid.perplexity, epoch, 0
            else:
                progress.bad_epochs += 1
            self.save(epoch, improved)
            record = {
                "epoch": epoch,
                "lr": lr,
                "train_ppl": perplexity(stats["ce"]),
                "valid_ppl": valid.perplexity,
                "best_valid_ppl": progress.best_valid_ppl,
                "train_tokens_per_s": stats["tokens"] / train_s,
                "epoch_s": epoch_s,
                "elapsed_s": progress.elapsed_s,
            }
            if self.augmented is not None:
                record["train_kl"] = stats["kl"]
            self._log_metrics(record)
        return self.final_report()

    def final_report(self) -> dict[str, Any]:
        if not (self.run_dir / "best" / MODEL_FILE).is_file():
            raise TiedlmError(f"{self.run_dir}: no epoch reached a finite validation perplexity (training diverged)")
        load_model(self.model, str(self.run_dir / "best" / MODEL_FILE), device=str(self.device))
        data = self.config.data
        valid = evaluate(self.model, self.corpus.valid, data.eval_batch_size, data.bptt)
        test = evaluate(self.model, self.corpus.test, data.eval_batch_size, data.bptt)
        stopped = "patience" if self.progress.bad_epochs >= self.config.train.patience else "max_epochs"
        report = {
            "event": "final",
            "best_epoch": self.progress.best_epoch,
            "epochs": self.progress.epoch,
            "stopped_by": stopped,
            "valid_ppl": valid.perplexity,
            "test_ppl": test.perplexity,
            "eval_batch_size": data.eval_batch_size,
            "paper_valid_ppl": self.config.paper.valid,
            "paper_test_ppl": self.config.paper.test,
            "elapsed_s": self.progress.elapsed_s,
        }
        write_text_atomic(self.run_dir / "final.json", json.dumps(report, indent=2) + "\n")
        return report
