"""Keep resumable copies of unfinished runs in the repository, so that losing the machine that trains
them costs at most the work since the last stash (campaign/README.md).

    python scripts/stash_runs.py save /work/runs campaign/stash RUN_DIR...   # before a session stops
    python scripts/stash_runs.py restore campaign/stash /work/runs           # on a machine without the runs

``save`` replaces STASH with one copy of each RUN_DIR (a folder under RUNS; finished runs are kept
when another run still starts from them): its logs (run.json, config.json, metrics.jsonl, final.json),
``best/`` and one checkpoint to resume from. That checkpoint is the newest one written at the end of an
epoch, where there is one, so a mid-epoch stop costs at most part of an epoch again; an end-of-epoch
checkpoint that is also the best one has the same weights as ``best/``, and git stores them once.

``restore`` copies every stashed run back to the same place under RUNS, after checking every
checkpoint's manifest. A run folder already there is left alone: it is at least as new as the stash.
Run folders name their corpus and any ``train.init_from`` source by absolute path, so RUNS must be the
path the runs were trained under.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from tiedlm.checkpoint import run_checkpoints, verify_checkpoint
from tiedlm.errors import TiedlmError

LOGS = ("run.json", "config.json", "metrics.jsonl", "final.json")
INDEX = "stash.json"


def resume_point(run_dir: Path) -> Path:
    """The checkpoint a stash keeps: the newest end-of-epoch one, else the newest of all."""
    checkpoints = run_checkpoints(run_dir)
    if not checkpoints:
        raise TiedlmError(f"{run_dir}: no checkpoint to stash (checkpoints/ is empty or missing)")
    whole_epochs = [c for c in checkpoints if "+" not in c.name]
    return (whole_epochs or checkpoints)[-1]


def _copy_run(run_dir: Path, target: Path) -> dict:
    """Copy the logs, best/ and the resume point of ``run_dir`` into ``target``; what the index records."""
    if not (run_dir / "run.json").is_file():
        raise TiedlmError(f"{run_dir}: not a run folder (it has no run.json)")
    checkpoint = resume_point(run_dir)
    for folder in (checkpoint, run_dir / "best"):
        if folder.is_dir():
            verify_checkpoint(folder)
    target.mkdir(parents=True)
    for name in LOGS:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, target / name)
    if (run_dir / "best").is_dir():
        shutil.copytree(run_dir / "best", target / "best")
    shutil.copytree(checkpoint, target / "checkpoints" / checkpoint.name)
    return {"checkpoint": checkpoint.name, "finished": (run_dir / "final.json").is_file()}


def save(runs: Path, stash: Path, run_dirs: list[Path]) -> dict:
    """Replace ``stash`` by copies of ``run_dirs`` (each under ``runs``); returns the index written."""
    index = {"saved": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": {}}
    tmp = stash.with_name(f".{stash.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for run_dir in run_dirs:
            try:
                relative = run_dir.absolute().relative_to(runs.absolute())
            except ValueError:
                raise TiedlmError(f"{run_dir}: not under {runs}") from None
            index["runs"][str(relative)] = _copy_run(run_dir, tmp / relative)
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = stash.with_name(f".{stash.name}.old")
    if stash.exists():
        stash.rename(old)
    tmp.rename(stash)
    shutil.rmtree(old, ignore_errors=True)
    return index


def restore(stash: Path, runs: Path) -> list[str]:
    """Copy each stashed run to ``runs`` where it is missing; returns the runs copied."""
    try:
        index = json.loads((stash / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TiedlmError(f"{stash / INDEX}: cannot read the stash's index ({exc.__class__.__name__})") from None
    copied = []
    for relative, entry in index["runs"].items():
        source, target = stash / relative, runs / relative
        if (target / "run.json").exists():
            continue
        for folder in (source / "best", source / "checkpoints" / entry["checkpoint"]):
            if folder.is_dir():
                verify_checkpoint(folder)
        tmp = target.with_name(f".{target.name}.restore-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        tmp.rename(target)
        copied.append(relative)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    saving = commands.add_parser("save", help="replace STASH with resumable copies of the RUN_DIRs")
    saving.add_argument("runs", type=Path, help="the folder the runs lie under (kept as their relative paths)")
    saving.add_argument("stash", type=Path)
    saving.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    restoring = commands.add_parser("restore", help="copy the stashed runs back where they are missing")
    restoring.add_argument("stash", type=Path)
    restoring.add_argument("runs", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "save":
            index = save(args.runs, args.stash, args.run_dirs)
            for relative, entry in index["runs"].items():
                print(f"stashed {relative} at {entry['checkpoint']}")
        else:
            copied = restore(args.stash, args.runs)
            print("restored " + (", ".join(copied) if copied else "nothing (every stashed run is already there)"))
    except (TiedlmError, OSError) as exc:
        print(f"stash_runs: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
