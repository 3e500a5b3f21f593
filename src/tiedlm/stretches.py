"""A run's stretches: the processes that trained it, its start and every resume, as its run.json records them.

A long run crosses sessions, machines, commits and perhaps precisions; the results tables say which
stretch ran where, so that every number can be traced to the hardware that produced it.
"""

from __future__ import annotations

from typing import Any


def hardware_text(info: dict[str, Any]) -> str:
    """The machine a run started on, and any other one it was resumed on (``A; resumed on B``)."""
    first = info.get("hardware") or f"{info.get('device_name', '?')}, {info.get('threads', '?')} threads"
    later = [r["hardware"] for r in info.get("resumed", []) if r.get("hardware")]
    others = [h for h in dict.fromkeys(later) if h != first]
    return "; ".join([first, *(f"resumed on {h}" for h in others)])


def stretch_rows(info: dict[str, Any], config: dict[str, Any], last_epoch: int) -> list[dict[str, Any]]:
    """Each process that trained the run (its start, then every resume): when, where, and the epochs it ended.

    A stretch that was stopped mid-epoch ends no epoch of its own: the next one finishes that epoch.
    """
    stretches = [info, *info.get("resumed", [])]
    firsts = [1, *(r.get("from_epoch") for r in stretches[1:])]
    rows = []
    for index, stretch in enumerate(stretches):
        first = firsts[index]
        after = firsts[index + 1] if index + 1 < len(firsts) else last_epoch + 1
        ended = f"{first}–{after - 1}" if isinstance(first, int) and isinstance(after, int) and after > first else ""
        rows.append(
            {
                "started": stretch.get("started"),
                "epochs": ended,  # "" when it ended none (or an old run.json lacks from_epoch)
                "hardware": stretch.get("hardware") or f"{info.get('device_name', '?')}",
                "cpu_features": stretch.get("cpu_features"),
                "precision": stretch.get("precision") or (config["train"]["precision"] if index == 0 else None),
                "commit": stretch.get("commit"),
            }
        )
    return rows


def precision_text(info: dict[str, Any], config: dict[str, Any]) -> str:
    """The precision of every stretch of a run, by epoch: ``fp32``, or ``bf16 (epochs 1-12); fp32 (13-)``."""
    first = info.get("precision") or config["train"]["precision"]
    stretches = [(1, first)]
    for resumed in info.get("resumed", []):
        if resumed.get("precision") and resumed["precision"] != stretches[-1][1]:
            stretches.append((resumed.get("from_epoch", "?"), resumed["precision"]))
    if len(stretches) == 1:
        return first
    parts = []
    for index, (start, precision) in enumerate(stretches):
        end = stretches[index + 1][0] if index + 1 < len(stretches) else None
        span = f"{start}-{end - 1}" if isinstance(end, int) else f"{start}-"
        parts.append(f"{precision} (epochs {span})")
    return "; ".join(parts)
