"""What scripts/gpu_run.sh brings back: the facts of each run and the files of $OUT (tiedlm/gpu_run.py).

$OUT holds at most ``OUT_FILES`` files of at most ``OUT_FILE_BYTES`` each (``OUT_TOTAL_BYTES`` in
all), rewritten after every run so that a killed command still returns them: summary.json,
logs.tar.gz, runs.tar.gz (each run's small files), results.tar.gz and ckpt-TABLE-VARIANT.tar
while they fit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

OUT_FILES, OUT_FILE_BYTES, OUT_TOTAL_BYTES = 8, 16 << 20, 60 << 20


def elapsed_minutes(run_dir: Path) -> float:
    """Training minutes a run folder already holds (train.time_limit counts them too)."""
    from tiedlm.run_folder import RunFolder

    with contextlib.suppress(KeyError, IndexError):
        return RunFolder(run_dir).records()[-1]["elapsed_s"] / 60
    return 0.0


def run_facts(run_dir: Path) -> dict[str, Any]:
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


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # one per writer: two lanes may write it at once
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
        write_atomic(out / name, data)
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
    write_atomic(out / "summary.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
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
