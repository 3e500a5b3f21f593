"""The long fault-injection campaign behind results/reliability.md.

    .venv/bin/python scripts/fault_campaign.py --random-kills 40 --seed 1

Trains a small model in child processes and breaks them in every way the
default tests do, many more times: SIGKILL at random moments and inside each
step of a checkpoint write, SIGINT/SIGTERM (once and twice), damaged
checkpoint files, NaN losses. Each interrupted run is resumed and must end with
weights bit-identical to an uninterrupted run, and every checkpoint under a
real name must verify. Writes results/reliability.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fault_harness as harness  # noqa: E402


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def outcome(run: Path, reference, config: Path) -> bool:
    harness.train_to_end(config, run)
    intact = harness.visible_files_intact(run)
    final = json.loads((run / "final.json").read_text())
    return (
        intact and harness.same_weights(harness.final_weights(run), reference[0]) and final["test_ppl"] == reference[1]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-kills", type=int, default=40, help="runs killed at random moments")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "reliability")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tiedlm-faults-"))
    started = time.perf_counter()
    config = harness.fault_config(work)

    start = time.perf_counter()
    process = harness.tiedlm("train", config, "--out", work / "reference")
    harness.wait_for(work / "reference" / "checkpoints" / "epoch-0000")
    training_started = time.perf_counter()
    code, err = harness.finish(process)
    assert code == 0, err
    reference_s = time.perf_counter() - start
    training_s = time.perf_counter() - training_started  # from the first checkpoint to the exit
    reference = (
        harness.final_weights(work / "reference"),
        json.loads((work / "reference" / "final.json").read_text())["test_ppl"],
    )
    rows: list[dict] = []

    def record(kind: str, detail: str, faults: int, ok: bool) -> None:
        rows.append({"kind": kind, "detail": detail, "faults": faults, "identical_and_intact": ok})
        print(f"{kind:<22} {detail:<40} faults={faults} ok={ok}", flush=True)

    for index in range(args.random_kills):  # 1 to 3 SIGKILLs at random moments, then resume to the end
        run = work / f"random-{index}"
        kills = rng.randint(1, 3)
        delays = [harness.kill_randomly(config, run, rng, window_s=reference_s) for _ in range(kills)]
        record(
            "sigkill-random", "delays " + ", ".join(f"{d:.2f}s" for d in delays), kills, outcome(run, reference, config)
        )

    for point in harness.KILL_POINTS:  # SIGKILL inside a checkpoint write, at its n-th call
        for nth in (1, 2, 3, 5, 7):
            run = work / f"{point}-{nth}"
            code, _ = harness.finish(harness.tiedlm("train", config, "--out", run, kill_at=(point, nth)))
            killed = code == -signal.SIGKILL
            record("sigkill-in-write", f"{point}, call {nth}", int(killed), outcome(run, reference, config))

    for name, signals in (
        ("sigint", [signal.SIGINT]),
        ("sigterm", [signal.SIGTERM]),
        ("sigint-twice", [signal.SIGINT] * 2),
    ):
        for index in range(4):
            run = work / f"{name}-{index}"
            process = harness.tiedlm("train", config, "--out", run)
            harness.wait_for(run / "checkpoints" / "epoch-0000")
            time.sleep(rng.uniform(0.0, 0.5 * training_s))  # while it trains
            finished = (run / "final.json").exists()  # the run had completed: the signal hits its exit
            for signum in signals:
                process.send_signal(signum)
            code, _ = harness.finish(process)
            expected = {128 + signals[0]} | ({0, -signals[0]} if finished else set())
            ok = code in expected and outcome(run, reference, config)
            when = "after the run completed" if finished else "during training"
            record(name, f"exit {code} ({when}; expected {sorted(expected)})", len(signals), ok)

    damages = {
        "truncate weights": lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
        "flip a byte": lambda f: _flip_middle_byte(f),
        "empty file": lambda f: f.write_bytes(b""),
        "delete file": lambda f: f.unlink(),
    }
    for damage, apply in damages.items():
        for victim in ("model.safetensors", "trainer_state.json", "trainer_state.safetensors", "manifest.json"):
            run = work / f"damage-{damage}-{victim}".replace(" ", "_")
            shutil.copytree(work / "reference", run, ignore=shutil.ignore_patterns(".lock"))
            latest = sorted((run / "checkpoints").iterdir())[-1]
            target = latest / victim
            apply(target)
            (run / "final.json").unlink()
            code, err = harness.finish(harness.tiedlm("train", "--resume", run))
            named = victim in err and "falling back" in err
            ok = (
                code == 0
                and named
                and harness.visible_files_intact(run)
                and harness.same_weights(harness.final_weights(run), reference[0])
            )
            record("damaged-checkpoint", f"{damage}: {victim}", 1, ok)

    nan = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "nan_injection.py"), str(config), str(work / "nan")],
        capture_output=True, text=True,
    )  # fmt: skip
    for line in nan.stdout.splitlines():
        row = json.loads(line)
        record("nan-injection", row["detail"], row["faults"], row["ok"])

    total_s = time.perf_counter() - started
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "seed": args.seed,
        "wall_s": round(total_s, 1),
        "reference_run_s": round(reference_s, 2),
        "reference_training_s": round(training_s, 2),
        "cases": len(rows),
        "faults_injected": sum(r["faults"] for r in rows),
        "all_ok": all(r["identical_and_intact"] for r in rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, args.out.with_suffix(".md"))
    shutil.rmtree(work)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


def write_markdown(summary: dict, path: Path) -> None:
    kinds: dict[str, list[dict]] = {}
    for row in summary["rows"]:
        kinds.setdefault(row["kind"], []).append(row)
    table = "\n".join(
        f"| {kind} | {len(rows)} | {sum(r['faults'] for r in rows)} | {sum(r['identical_and_intact'] for r in rows)} |"
        for kind, rows in kinds.items()
    )
    failures = [r for r in summary["rows"] if not r["identical_and_intact"]]
    passed = len(summary["rows"]) - len(failures)
    text = f"""# Reliability: fault-injection campaign

Generated by `scripts/fault_campaign.py` (do not edit by hand); the per-case
rows are in [`reliability.json`](reliability.json).

- command: `{summary["command"]}`
- commit: `{summary["commit"]}`, date {summary["date"]}
- machine: {summary["machine"]}, Python {summary["python"]}; seed {summary["seed"]}
- wall time: {summary["wall_s"]} s (one uninterrupted run: {summary["reference_run_s"]} s, of which
  {summary["reference_training_s"]} s from the first checkpoint to the exit)

## What was tried

A small VD-LSTM with the augmented loss (tests/conftest.py's tiny config, 4
epochs) is trained in a child process and broken; the run is then resumed
with `tiedlm train --resume RUN` until it completes. A case passes when its
final weights are **bit-identical** to an uninterrupted run with the same
seed, its test perplexity is the same, and every checkpoint folder under a
real name verifies against its SHA-256 manifest.

| kind | cases | faults injected | passed |
|---|---:|---:|---:|
{table}
| **total** | {summary["cases"]} | {summary["faults_injected"]} | {passed} |

- **sigkill-random**: 1–3 `SIGKILL`s per run at uniformly random moments
  (start-up, training, validation, checkpoint writes alike).
- **sigkill-in-write**: the process kills itself inside a checkpoint write, at
  the n-th call of: `save_model` (weights in the temporary folder),
  `_seal` (before the manifest), `_install_dir` (old folder renamed away,
  new one not yet in place), `remove_dir` (old checkpoint renamed, not deleted).
- **sigint / sigterm**: one signal at a random moment while the run trains
  (between its first checkpoint and half of an uninterrupted run's remaining
  time): the current window finishes, a checkpoint is written, and the exit
  code must be 130 / 143. A signal that arrives after the run has completed
  (its final.json exists) hits the process's exit; then exit 0 or death by the
  signal is also accepted, and the row says so.
  **sigint-twice**: the second signal exits at once.
- **damaged-checkpoint**: a file of the newest checkpoint truncated, altered,
  emptied or deleted; `--resume` must name it, fall back to the previous
  checkpoint, and retrain the lost epoch to the same weights.
- **nan-injection**: NaN losses injected into training in-process (single
  steps, and runs of `nonfinite_patience` in a row that force a rollback with
  the learning rate halved); passes when the steps are skipped and logged,
  the rollback happens, and the weights stay finite.

## Result

{"Nothing was lost: every case passed." if summary["all_ok"] else "FAILURES: " + json.dumps(failures)}
At most the current epoch's progress is redone after a `SIGKILL`; a signal
loses nothing.
"""
    path.write_text(text)


if __name__ == "__main__":
    main()
