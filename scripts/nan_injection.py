"""NaN/inf injection scenarios for scripts/fault_campaign.py: one JSON line per scenario.

python scripts/nan_injection.py CONFIG.toml WORKDIR
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from tiedlm.checkpoint import load_checkpoint
from tiedlm.config import load_config
from tiedlm.training import Trainer


def inject(calls: set[int], value: float):
    """A fault hook (tiedlm.training.TrainingStep.fault_hook) that multiplies the cross-entropy of the
    given windows (counted from 1 over the whole run) by ``value``."""
    count = [0]

    def fault_hook(ce):
        count[0] += 1
        return ce * value if count[0] in calls else ce

    return fault_hook


def scenario(config_path: Path, run: Path, calls: set[int], value: float, patience: int) -> dict:
    config = load_config(config_path, [f"train.nonfinite_patience={patience}"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        report = Trainer(config, run, fault_hook=inject(calls, value)).fit()
    log = err.getvalue()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finite = all(torch.isfinite(p).all() for p in load_checkpoint(run).model.parameters())
    rollbacks = log.count("non-finite steps in a row: restored")
    skipped = log.count("step skipped")
    expected_rollbacks = 1 if len(calls) >= patience else 0
    ok = finite and skipped == len(calls) and rollbacks >= expected_rollbacks and math_ok(report)
    return {
        "detail": f"{len(calls)} x {value} (patience {patience}), rollbacks {rollbacks}",
        "faults": len(calls),
        "ok": ok,
        "skipped_logged": skipped,
        "final_skipped_steps": metrics[-1]["skipped_steps"],
    }


def math_ok(report: dict) -> bool:
    return report["valid_ppl"] == report["valid_ppl"] and report["valid_ppl"] < float("inf")


def main() -> None:
    config, work = Path(sys.argv[1]), Path(sys.argv[2])
    cases = [
        ({5}, float("nan"), 5),
        ({5, 40, 200}, float("inf"), 5),
        ({100, 101, 102}, float("nan"), 3),
        ({100, 101, 102, 103, 104}, float("nan"), 5),
        (set(range(150, 160)), float("nan"), 3),
    ]
    for index, (calls, value, patience) in enumerate(cases):
        print(json.dumps(scenario(config, work / f"nan-{index}", calls, value, patience)), flush=True)


if __name__ == "__main__":
    main()
