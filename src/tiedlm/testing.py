"""Helpers for testing code that trains with tiedlm: a tiny synthetic corpus and config that train
in seconds, and `tiedlm` child processes to interrupt and break.

tiedlm's own tests (tests/) and its fault campaign (scripts/fault_campaign.py) use them; so can
yours. A child is broken at a chosen step of a checkpoint write through the documented fault
hook (``TIEDLM_FAULT_AT``, :func:`tiedlm.checkpoint.fault_point`), never by patching code.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tiedlm.checkpoint import FAULT_ENV, FAULT_POINTS, run_checkpoints, verify_checkpoint

TINY_CONFIG = """
name = "tiny"
seed = 3

[data]
corpus = "{corpus}"
batch_size = 4
bptt = 6
eval_batch_size = 2

[model]
hidden_size = 12
dropout = 0.3
dropout_mode = "{mode}"
tie_weights = {tie}
init_range = 0.1

[loss]
augmented = {augmented}
tau = 5.0
gamma = 0.5

[train]
lr = 1.0
lr_decay = 0.8
lr_decay_start = 2
max_epochs = 2
patience = 3
device = "cpu"
"""


def write_corpus(root: Path, words: int = 1500, vocab: int = 30, seed: int = 0, unk: bool = True) -> Path:
    """A corpus whose text follows a simple pattern, so a model can learn it."""
    rng = random.Random(seed)
    lexicon = [f"w{i}" for i in range(vocab)] + (["<unk>"] if unk else [])

    def text(n: int) -> str:
        lines, line = [], []
        for _ in range(n):
            word = lexicon[(len(line) * 3 + rng.randrange(3)) % len(lexicon)]
            line.append(word)
            if len(line) >= rng.randrange(4, 12):
                lines.append(" ".join(line))
                line = []
        lines.append(" ".join(line))
        return "\n".join(lines) + "\n"

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(text(words) + " ".join(lexicon) + "\n")
    (root / "valid.txt").write_text(text(words // 5))
    (root / "test.txt").write_text(text(words // 5))
    return root


def write_config(path: Path, corpus: Path, *, mode: str = "exact", tie: bool = True, augmented: bool = True) -> Path:
    path.write_text(
        TINY_CONFIG.format(corpus=corpus, mode=mode, tie=str(tie).lower(), augmented=str(augmented).lower())
    )
    return path


KILL_POINTS = FAULT_POINTS  # where a checkpoint write can be killed (tiedlm.checkpoint.fault_point)


def fault_config(root: Path, epochs: int = 4, words: int = 6000) -> Path:
    corpus = write_corpus(root / "corpus", words=words)
    config = write_config(root / "fault.toml", corpus)
    config.write_text(config.read_text().replace("max_epochs = 2", f"max_epochs = {epochs}"))
    return config


def tiedlm(*args: object, kill_at: tuple[str, int] | None = None) -> subprocess.Popen:
    """Start `tiedlm ARGS` in a child; with kill_at=(point, n) it SIGKILLs itself the n-th time it
    reaches that fault point of a checkpoint write (``TIEDLM_FAULT_AT``, docs/faults.md)."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV} | {"PYTHONUNBUFFERED": "1"}
    if kill_at is not None:
        env[FAULT_ENV] = f"{kill_at[0]}:{kill_at[1]}"
    command = [sys.executable, "-m", "tiedlm", *(str(a) for a in args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def train_to_end(config: Path, run: Path) -> list[tuple[int, str]]:
    """Run (or resume) training until it completes; return (exit code, stderr) of each attempt."""
    attempts = []
    for _ in range(5):
        fresh = not (run / "checkpoints").is_dir() or not any(
            p.name.startswith("epoch-") for p in (run / "checkpoints").iterdir()
        )
        args = ("train", config, "--out", run) if fresh else ("train", "--resume", run)
        code, err = finish(tiedlm(*args))
        attempts.append((code, err))
        if code == 0:
            return attempts
    raise AssertionError(f"training did not complete: {attempts}")


def kill_randomly(config: Path, run: Path, rng: random.Random, window_s: float) -> float:
    """Start or resume training and SIGKILL it after a random delay; return the delay."""
    fresh = not (run / "checkpoints").is_dir()
    process = tiedlm(*(("train", config, "--out", run) if fresh else ("train", "--resume", run)))
    delay = rng.uniform(0.2, window_s)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    process.communicate()
    return delay


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = sorted((run / "checkpoints").iterdir())[-1]
    # clone: load_file memory-maps the file, and a test may damage it afterwards
    return {k: v.clone() for k, v in load_file(str(last / "model.safetensors")).items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def visible_files_intact(run: Path) -> bool:
    """Every checkpoint folder under a real name verifies against its manifest."""
    folders = run_checkpoints(run) + ([run / "best"] if (run / "best").exists() else [])
    for folder in folders:
        verify_checkpoint(folder)
    return True
