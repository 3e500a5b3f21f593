"""A run folder: what ``tiedlm train`` writes and everything else reads.

docs/checkpoints.md lays the folder out; this is the one place that reads and writes its
logs. ``metrics.jsonl`` holds one JSON object per epoch (appended and flushed to disk as each
epoch ends), ``run.json`` the provenance of the run and of every resume
(:func:`tiedlm.runtime.provenance`), ``config.json`` the resolved config, ``final.json`` the
valid/test perplexity of ``best/`` when training ends; ``checkpoints/`` and ``best/`` hold
checkpoint folders (tiedlm/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from tiedlm.checkpoint import MODEL_FILE, VOCAB_FILE, run_checkpoints, write_error, write_text_atomic
from tiedlm.errors import TiedlmError

METRICS, RUN_INFO, FINAL, CONFIG = "metrics.jsonl", "run.json", "final.json", "config.json"


def read_json(path: Path) -> Any:
    """A JSON file of a run folder; a one-line error if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TiedlmError(f"{path}: missing (the run folder is incomplete)") from None
    except (OSError, ValueError) as exc:
        raise TiedlmError(f"{path}: unreadable ({exc})") from None


def read_epochs(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a metrics.jsonl (lines with ``epoch`` and ``valid_ppl``; other events skipped).

    A line that is not JSON is a one-line error naming it."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise TiedlmError(f"{path}:{number}: not a JSON line") from None
        if isinstance(record, dict) and "valid_ppl" in record and "epoch" in record:
            records.append(record)
    return records


class RunFolder:
    """The files of one run folder, by name (docs/checkpoints.md)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics = self.path / METRICS
        self.run_info = self.path / RUN_INFO
        self.final = self.path / FINAL
        self.config = self.path / CONFIG
        self.best = self.path / "best"
        self.checkpoints_dir = self.path / "checkpoints"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- what it holds -------------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Its checkpoints in ``checkpoints/``, oldest position first."""
        return run_checkpoints(self.path)

    @property
    def started(self) -> bool:
        """Training got as far as its first checkpoint: ``tiedlm train --resume`` continues it."""
        return self.checkpoints_dir.is_dir()

    def holds_run(self) -> bool:
        """A run has trained here (a checkpoint, or an epoch logged): a fresh one must not start in it."""
        return bool(self.checkpoints()) or (self.metrics.is_file() and self.metrics.stat().st_size > 0)

    @property
    def finished(self) -> bool:
        """It has a final.json newer than its last epoch (a run resumed after it ended keeps the old one)."""
        return self.read_final() is not None

    def has_best(self) -> bool:
        return (self.best / MODEL_FILE).is_file()

    def vocab_size(self) -> int:
        """Words in the vocabulary of ``best/``."""
        vocab = self.best / VOCAB_FILE
        if not vocab.is_file():
            raise TiedlmError(f"{vocab}: missing (no epoch has finished yet)")
        return sum(1 for line in vocab.read_text(encoding="utf-8").splitlines() if line)

    # --- metrics.jsonl -------------------------------------------------------------------------------------

    def epochs(self) -> list[dict[str, Any]]:
        """The per-epoch records (none where no epoch has been logged); see :func:`read_epochs`."""
        return read_epochs(self.metrics) if self.metrics.is_file() else []

    def records(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl that reads as JSON (a line cut short by a crash is left out)."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def append_metrics(self, record: dict[str, Any]) -> str:
        """Append one record as a line, flushed to disk; returns the line."""
        line = json.dumps(record)
        try:
            with open(self.metrics, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # a line cut short is dropped on resume (truncate_metrics)
            raise write_error(self.metrics, exc, len(line) + 1) from None
        return line

    def truncate_metrics(self, epoch: int) -> None:
        """Keep the records of epochs up to ``epoch`` (those a resumed run has behind it)."""
        if self.metrics.exists():
            kept = []
            for line in self.metrics.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):  # a line cut short by a crash is dropped
                    if json.loads(line).get("epoch", 0) <= epoch:
                        kept.append(line)
            write_text_atomic(self.metrics, "".join(line + "\n" for line in kept))

    # --- run.json, config.json, final.json -----------------------------------------------------------------

    def read_run_info(self) -> dict[str, Any]:
        return read_json(self.run_info)

    def write_run_info(self, info: dict[str, Any]) -> None:
        write_text_atomic(self.run_info, json.dumps(info, indent=2) + "\n")

    def write_config(self, config: dict[str, Any]) -> None:
        write_text_atomic(self.config, json.dumps(config, indent=2) + "\n")

    def record_resume(self, entry: dict[str, Any], missing: dict[str, Any]) -> None:
        """Add one resume to run.json's ``resumed`` list; ``missing`` fills keys an older run.json lacks."""
        try:
            info = json.loads(self.run_info.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        for key, value in missing.items():
            info.setdefault(key, value)
        info.setdefault("resumed", []).append(entry)
        self.write_run_info(info)

    def recorded(self, key: str) -> Any:
        """One value of run.json, None where it or the file is missing or unreadable."""
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.run_info.read_text(encoding="utf-8")).get(key)
        return None

    def write_final(self, report: dict[str, Any]) -> None:
        write_text_atomic(self.final, json.dumps(report, indent=2) + "\n")

    def read_final(self) -> dict[str, Any] | None:
        """final.json, or None where there is none or it is older than the last epoch logged."""
        return current_final(self.final, self.epochs())


class InRunFolder:
    """Mixin for a record with a ``run_dir`` (a scheduled job, a table's stage): its folder and state."""

    run_dir: Path

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    @property
    def started(self) -> bool:
        return self.folder.started

    @property
    def finished(self) -> bool:
        """It has a final.json newer than its last epoch (a run resumed after it ended keeps the old one)."""
        return self.folder.finished


def current_final(path: Path, epochs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The final.json at ``path`` unless the run went on after it (resumed after it ended): then None."""
    if not Path(path).is_file():
        return None
    final = read_json(path)
    if epochs and epochs[-1]["epoch"] > final.get("epochs", 0):
        return None
    return final


def run_folder_of(resume: Path) -> Path:
    """The run folder that ``--resume`` continues: the folder itself, or the run of a checkpoint folder
    (``RUN/checkpoints/epoch-…`` or ``RUN/best``)."""
    if (resume / MODEL_FILE).exists():
        return resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
    if resume.is_dir():
        return resume
    raise TiedlmError(f"--resume {resume}: no such run or checkpoint folder")
