"""Run `tiedlm train` in child processes and break them: SIGKILL at a random moment
or inside a chosen step of a checkpoint write, SIGINT/SIGTERM, corrupted files.
Used by tests/test_faults.py and by scripts/fault_campaign.py (the long campaign)."""

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

from conftest import write_config, write_corpus

# Points inside a checkpoint write where the child kills itself with SIGKILL:
#   save_model   weights written to the temporary folder, nothing sealed or renamed
#   _seal        all files written, manifest not yet
#   _install_dir the old folder renamed away (when replacing best/), the new one not yet in place
#   remove_dir   an old checkpoint renamed to its hidden name, not yet deleted
KILL_POINTS = ("save_model", "_seal", "_install_dir", "remove_dir")

_CHILD = """
import os, signal, sys
import tiedlm.checkpoint as ck
point, nth = sys.argv[1], int(sys.argv[2])
calls = [0]
original = getattr(ck, point)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] != nth:
        return original(*args, **kwargs)
    if point == "save_model":
        original(*args, **kwargs)
    elif point == "_install_dir":
        tmp, path = args
        if path.exists():
            os.rename(path, path.with_name(f".{path.name}.old-{os.getpid()}"))
    elif point == "remove_dir":
        (path,) = args
        os.rename(path, path.with_name(f".{path.name}.old-{os.getpid()}"))
    die()

setattr(ck, point, wrapped)
from tiedlm.cli import main
sys.exit(main(sys.argv[3:]))
"""


def fault_config(root: Path, epochs: int = 4, words: int = 6000) -> Path:
    corpus = write_corpus(root / "corpus", words=words)
    config = write_config(root / "fault.toml", corpus)
    config.write_text(config.read_text().replace("max_epochs = 2", f"max_epochs = {epochs}"))
    return config


def tiedlm(*args: object, kill_at: tuple[str, int] | None = None) -> subprocess.Popen:
    """Start `tiedlm ARGS` in a child; with kill_at=(point, n) it SIGKILLs itself at the n-th call of point."""
    argv = [str(a) for a in args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if kill_at is None:
        command = [sys.executable, "-m", "tiedlm", *argv]
    else:
        command = [sys.executable, "-c", _CHILD, kill_at[0], str(kill_at[1]), *argv]
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
    from tiedlm.checkpoint import run_checkpoints, verify_checkpoint

    folders = run_checkpoints(run) + ([run / "best"] if (run / "best").exists() else [])
    for folder in folders:
        verify_checkpoint(folder)
    return True
