"""What training does when something goes wrong (docs/faults.md), behind named calls.

- A signal: :class:`StopFlag` turns the first SIGINT/SIGTERM into a request to finish the
  current window and write a checkpoint (then :class:`Interrupted`, exit 130/143); a second
  one exits at once (every write is atomic).
- Non-finite steps: after ``train.nonfinite_patience`` of them in a row the epoch raises
  :class:`Rollback`, and the trainer restores its last good checkpoint with the learning rate
  halved, at most :data:`MAX_ROLLBACKS` times (:func:`check_rollbacks_left`).
- The run folder: :func:`check_writable` and :func:`check_free_space` before anything is
  trained, and :class:`RunLock`, so that two processes never train into one folder;
  :func:`repair_best` after a crash between an epoch's checkpoint and best/.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch

from tiedlm.checkpoint import STATE_JSON, checkpoint_name, link_checkpoint, verify_checkpoint
from tiedlm.distributed import World
from tiedlm.errors import TiedlmError
from tiedlm.run_folder import RunFolder

KEEP_CHECKPOINTS = 2  # in checkpoints/, besides best/
MAX_ROLLBACKS = 8


def say(message: str) -> None:
    """A note on stderr, ``tiedlm: …`` (what training tells the user besides the metrics)."""
    print(f"tiedlm: {message}", file=sys.stderr)


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint} written")
        self.exit_code = 128 + signum


class Rollback(Exception):
    """Too many non-finite steps in a row: go back to the last good checkpoint."""


class StopFlag:
    """SIGINT and SIGTERM while training: the first sets ``signum``, a second exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
            return
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def release(self) -> None:
        """Give the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: leave now; every write is atomic
            os._exit(128 + signum)
        self.signum = signum
        say(f"{signal.Signals(signum).name}: finishing this window, then writing a checkpoint (again to quit now)")

    def agreed(self, world: World, device: torch.device) -> bool:
        """Whether any rank has been asked to stop (in one process: whether this one has)."""
        if world.distributed:
            flag = torch.tensor([float(self.signum is not None)], device=device)
            if world.all_reduce_sum(flag).item() > 0 and self.signum is None:
                self.signum = signal.SIGTERM
        return self.signum is not None


def check_rollbacks_left(run_dir: Path, rollbacks: int) -> None:
    if rollbacks >= MAX_ROLLBACKS:
        raise TiedlmError(
            f"{run_dir}: training diverged: still non-finite after {MAX_ROLLBACKS} rollbacks "
            "(each halved the learning rate)"
        )


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` if need be and prove that a file can be written in it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TiedlmError(f"--out {run_dir}: exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test.tmp-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise TiedlmError(f"--out {run_dir}: not writable ({exc.strerror})") from None


def check_free_space(run_dir: Path, model: torch.nn.Module) -> None:
    """Refuse to start when the disk cannot hold the checkpoints a run keeps."""
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = model_bytes * (KEEP_CHECKPOINTS + 2) + (16 << 20)  # + best/ + the one being written
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise TiedlmError(
            f"--out {run_dir}: only {free / 2**20:.0f} MiB free, checkpoints need about {needed / 2**20:.0f} MiB"
        )


class RunLock:
    """An exclusive lock on RUN/.lock, held while training; the OS drops it if the process dies."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "?"
            self.handle.close()
            raise TiedlmError(f"--out {run_dir}: another tiedlm process (pid {owner}) is training in it") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def repair_best(folder: RunFolder, best_epoch: int) -> None:
    """After a crash between writing an epoch and updating best/, point best/ at the right epoch."""
    best = folder.best
    if best_epoch == 0:
        return
    try:
        verify_checkpoint(best)
        if json.loads((best / STATE_JSON).read_text())["progress"]["epoch"] == best_epoch:
            return
    except (TiedlmError, OSError, ValueError, KeyError):
        pass
    source = folder.checkpoints_dir / checkpoint_name(best_epoch)
    if source.is_dir():
        link_checkpoint(source, best)
        say(f"restored {best} from {source}")
    else:
        say(f"warning: {best} does not hold epoch {best_epoch} and that checkpoint is gone")
