"""One scheduler for experiments: ``tiedlm train`` subprocesses, several at once, one resume rule.

``tiedlm reproduce``, scripts/ablations.py and scripts/budget_compare.py describe their runs as
:class:`Job` s and hand them to :func:`run_jobs`. The resume rule (:meth:`Job.command`):

- a run whose folder holds a final.json newer than its last epoch is finished: it is left alone;
- a run that has checkpoints/ was interrupted: ``tiedlm train --resume RUN``;
- any other starts afresh: ``tiedlm train CONFIG --out RUN``.

A job's ``overrides`` are given at every start, fresh or resumed (a resumed run may change
``train.*``); its ``start_overrides`` only at the fresh start (they are then in the run's
config.json, which a resumed run reads back).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tiedlm.run_folder import InRunFolder, read_json


@dataclass
class Job(InRunFolder):
    """One run to train: its label in messages, config, run folder, settings, and the job it waits for."""

    label: str
    config: Path
    run_dir: Path
    overrides: list[str] = field(default_factory=list)  # --set at every start
    start_overrides: list[str] = field(default_factory=list)  # --set at the fresh start only
    after: Job | None = None  # starts once that one has finished
    log: Path | None = None  # default: RUN_DIR.log beside the run folder

    @property
    def ready(self) -> bool:
        """Whether it can start now: the job it waits for (if any) has finished."""
        return self.after is None or self.after.finished

    @property
    def log_path(self) -> Path:
        return self.log or self.run_dir.parent / f"{self.run_dir.name}.log"

    def command(self) -> list[str]:
        """The ``tiedlm`` arguments that start or continue this run (the resume rule above)."""
        if self.folder.started:
            command = ["train", "--resume", str(self.run_dir)]
        else:
            command = ["train", str(self.config), "--out", str(self.run_dir)]
            for text in self.start_overrides:
                command += ["--set", text]
        for text in self.overrides:
            command += ["--set", text]
        return command


def threads_per_job(jobs: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``jobs`` trainers at once: the cores split between them (unless
    OMP_NUM_THREADS is set already)."""
    env = dict(os.environ if env is None else env)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_jobs(
    todo: list[Job],
    jobs: int,
    say=print,
    python: str = sys.executable,
    cwd: Path | None = None,
    name: str = "experiments",
    again: str = "running it again",
) -> int | None:
    """Train the unfinished jobs, ``jobs`` at a time, each logging to its ``log_path``.

    Returns None when all finished, 128 + signal if stopped by one, 1 if a trainer failed.
    SIGINT/SIGTERM are passed on to the running trainers, which write a checkpoint and exit;
    ``name`` (who schedules) and ``again`` (what resumes them) are for the messages.
    """
    todo = [job for job in todo if not job.finished]
    env = threads_per_job(jobs)
    running: dict[subprocess.Popen, Job] = {}
    stop: list[int] = []
    failed: list[str] = []

    def forward(signum, frame):
        if not stop:
            say(f"{name}: {signal.Signals(signum).name}: stopping the running trainers (they checkpoint first)")
        stop.append(signum)
        for proc in running:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (not stop and any(job.ready for job in todo)):
            while not stop and len(running) < jobs and any(job.ready for job in todo):
                job = next(job for job in todo if job.ready)  # a later stage waits for the one before
                todo.remove(job)
                command = job.command()
                running[_start(job, [python, "-m", "tiedlm", *command], env, cwd)] = job
                say(f"{job.label}: training ({' '.join(['tiedlm', *command])}; log {job.log_path})")
            if not running:
                break
            finished = _wait_any(running)
            job = running.pop(finished)
            code = finished.returncode
            if code == 0:
                final = read_json(job.folder.final)
                say(f"{job.label}: done, valid {final['valid_ppl']:.2f}, test {final['test_ppl']:.2f}")
            elif code in (130, 143):
                say(f"{job.label}: stopped with a checkpoint; {again} resumes it")
            else:
                failed.append(job.label)
                say(f"{job.label}: tiedlm train failed (exit {code}); see {job.log_path}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        return 128 + stop[0]
    return 1 if failed else None


def _start(job: Job, command: list[str], env: dict[str, str], cwd: Path | None) -> subprocess.Popen:
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log_path, "a", encoding="utf-8") as log:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _wait_any(running: dict[subprocess.Popen, Job]) -> subprocess.Popen:
    while True:
        for proc in running:
            if proc.poll() is not None:
                return proc
        time.sleep(0.5)
