"""One prepared command for a lent GPU (``scripts/gpu_run.sh``): self-check, the training queue, $OUT.

    bash scripts/gpu_run.sh [--budget-s 540] [--precision auto] [--jobs N] [--only TABLE/VARIANT,...]
    bash scripts/gpu_run.sh --dry-run          the same on the CPU, on a tiny corpus, in seconds

In order, inside ``--budget-s`` seconds from the shell script's start (its install included):

1. **Self-check** (≤ 60 s, a subprocess; tiedlm/gpu_selfcheck.py): a tiny config trained for a few windows by the eager
   fp32 step (unique-target AL, the reference) and by the captured step (static-shape AL, CUDA
   graph), in fp32 and in the run precision; the losses and weights must agree. Then the speed of
   WikiText-2 medium REAL (|V| = 33,278, random Zipf tokens): eager and captured training tok/s,
   evaluation tok/s, and the projected seconds per epoch. Then two captured workers at once, to
   see whether two runs side by side raise the total throughput. The captured step is tried with
   the fused Triton LSTM cell (``TIEDLM_CUDA_CELL=on``, tiedlm/cuda_cell.py), then without it; if
   neither passes, the queue runs eagerly (``train.cuda_graph = off``). The summary says which ran.
2. **The queue**, in order: WikiText-2 medium RE, REAL; PTB medium REAL, RE, AL, VD; PTB large
   REAL, RE; ``--jobs`` at a time (default: 2 where the self-check measured a gain, else 1).
   Each is ``tiedlm train`` into ``WORK/runs/TABLE/VARIANT`` (the layout ``tiedlm reproduce``
   collects) with ``train.time_limit_minutes`` set to the time left, so it stops cleanly after
   an epoch; a run still going at the deadline gets SIGTERM (checkpoint, exit 143). No run is
   started with less than ``MIN_START_S`` left.
3. **$OUT** (tiedlm/gpu_out.py; at most 8 files of ≤ 16 MiB, rewritten after every run so that a killed command
   still returns them): ``summary.json``; ``logs.tar.gz`` (this driver's log, the self-check,
   every trainer's log); ``runs.tar.gz`` (``runs/TABLE/VARIANT/{metrics.jsonl, run.json,
   config.json, final.json, best/vocab.txt, …}`` and ``runs/TABLE/VARIANT.log``);
   ``results.tar.gz`` (``tiedlm reproduce TABLE --collect-only`` run there: TABLE.md/.json/.png);
   ``ckpt-TABLE-VARIANT.tar`` for the runs whose last checkpoint and best/ fit what is left.

Collect here: ``mkdir DIR && tar xzf runs.tar.gz -C DIR`` then
``tiedlm reproduce wikitext-2-medium --collect-only --runs DIR/runs``.

Longer than 400 lines because the driver is one sequence (self-check, queue under a deadline,
collect, pack) whose steps share its budget and state; the self-check and $OUT have their own
modules, tiedlm/gpu_selfcheck.py and tiedlm/gpu_out.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tiedlm.gpu_out import elapsed_minutes, pack_out, run_facts, summary_table, write_atomic
from tiedlm.gpu_selfcheck import DRY_OVERRIDES, SPEED_CONFIG, _device, _error_line, measure_speed, selfcheck

QUEUE = (
    ("wikitext-2-medium", "re"),
    ("wikitext-2-medium", "real"),
    ("ptb-medium", "real"),
    ("ptb-medium", "re"),
    ("ptb-medium", "al"),
    ("ptb-medium", "vd"),
    ("ptb-large", "real"),
    ("ptb-large", "re"),
)
DEFAULT_BUDGET_S = 540.0  # for a device-tool `run` with timeout_s = 600
PACK_RESERVE_S = 30.0  # the last packing, the collect and the summary
STOP_GRACE_S = 25.0  # SIGTERM → checkpoint → exit, before SIGKILL
RUN_OVERHEAD_S = 25.0  # start-up (CUDA, corpus, capture) + final evaluation, outside train.time_limit
MIN_START_S = 75.0  # no run starts with less than this left before the deadline
SELFCHECK_TIMEOUT_S = 75.0


def _now() -> float:
    return time.time()


class Log:
    """Lines to stdout (the device tool returns its tail) and to WORK/gpu_run.log (returned in logs.tar.gz)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)

    def __call__(self, message: str) -> None:
        line = f"gpu_run: {message}"
        print(line, flush=True)
        self.handle.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        self.handle.flush()


# --- the driver ------------------------------------------------------------------------------------------


class Driver:
    def __init__(self, args):
        self.args = args
        self.t0 = float(os.environ.get("GPU_RUN_T0") or _now())
        self.deadline = self.t0 + args.budget_s
        self.stop_at = self.deadline - PACK_RESERVE_S - STOP_GRACE_S  # trainers still going get SIGTERM
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.runs = self.work / "runs"
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.say = Log(self.work / "gpu_run.log")
        self.summary: dict[str, Any] = {"dry_run": args.dry_run, "budget_s": args.budget_s, "runs": []}
        self.configs = Path(args.configs).absolute()
        if args.dry_run and args.precision == "auto":
            args.precision = "fp32"  # the dry run checks the plumbing, fast, wherever bf16 is native or not

    def left(self) -> float:
        return self.deadline - _now()

    def main(self) -> int:
        say = self.say
        say(
            f"start; budget {self.args.budget_s:.0f} s from the script's start, {self.left():.0f} s left; "
            f"work {self.work}, out {self.out}"
        )
        self.summary["selfcheck"] = report = self.run_selfcheck()
        self.pack()
        if report.get("device") == "cpu" and not self.args.dry_run:
            say("no CUDA device: the queue is not run (nothing to gain on this machine's CPUs in minutes)")
            self.finish()
            return 1
        mode = "auto" if report.get("captured_ok") else "off"
        cell = report.get("cuda_cell", "off") if mode == "auto" else "off"
        os.environ["TIEDLM_CUDA_CELL"] = cell  # for every process from here on: workers and trainers
        self.summary["cuda_graph"], self.summary["cuda_cell"] = mode, cell
        if mode == "off":
            say(
                "the captured step failed or disagreed with the eager reference: the queue trains EAGERLY "
                "(train.cuda_graph = off)"
            )
        jobs = self.args.jobs or self.choose_jobs(report, mode)
        precision = report.get("precision", self.args.precision)
        self.summary["jobs"] = jobs
        self.pack()
        self.run_queue(jobs, mode, precision)
        self.finish()
        return 0

    # --- self-check and concurrency ---

    def run_selfcheck(self) -> dict[str, Any]:
        path = self.work / "selfcheck.json"
        command = [
            sys.executable,
            "-m",
            "tiedlm.gpu_run",
            "selfcheck",
            "--json",
            str(path),
            "--precision",
            self.args.precision,
            "--configs",
            str(self.configs),
            "--seconds",
            str(self.args.speed_seconds),
        ] + (["--dry-run"] if self.args.dry_run else [])
        began = _now()
        code = self._subprocess(command, self.work / "selfcheck.log", SELFCHECK_TIMEOUT_S)
        report = json.loads(path.read_text()) if path.is_file() else {"captured_ok": False}
        report["exit"] = code
        report["seconds"] = _now() - began
        if code not in (0, 124):  # a crash: no captured step; a timeout keeps what the report says was through
            report["captured_ok"] = False
        for check in report.get("checks", []):
            verdict = "OK" if check["ok"] else "FAILED"
            detail = check.get("error") or (
                f"max rel loss diff {check['max_rel_loss_diff']:.1e}, weights {check['max_rel_weight_diff']:.1e} "
                f"(tolerance {check['tolerance']:.0e}); windows {check['windows']}"
            )
            self.say(f"self-check {check['name']}: {verdict}: {detail}")
        speed = report.get("speed", {})
        for name, measured in speed.items():
            if name == "captured" or not isinstance(measured, dict):
                continue  # "captured" repeats the one chosen
            if "tok_s" in measured:
                rate = f"{measured['tok_s']:.0f} tok/s"
                self.say(f"speed {name} ({report['precision']}, WikiText-2 medium REAL): {rate}")
            else:
                self.say(f"speed {name}: {measured}")
        if "eval_tok_s" in speed:
            self.say(f"speed evaluation: {speed['eval_tok_s']:.0f} tok/s")
        if "projected_wt2_medium_epoch_s" in report:
            self.say(
                f"projected WikiText-2 medium REAL epoch: {report['projected_wt2_medium_epoch_s']:.1f} s "
                f"(40 epochs: {report['projected_40_epochs_min']:.1f} min)"
            )
        self.say(
            f"self-check: exit {code}, {report['seconds']:.0f} s, device {report.get('device_name', '?')}, "
            f"torch {report.get('torch', '?')}; captured step {'OK' if report['captured_ok'] else 'NOT used'}, "
            f"fused cell {report.get('cuda_cell', 'off')}"
        )
        return report

    def choose_jobs(self, report: dict[str, Any], mode: str) -> int:
        """2 where two workers at once train more tokens per second in all than one alone (by ≥ 10%)."""
        single = report.get("speed", {}).get("captured" if mode == "auto" else "eager", {}).get("tok_s")
        if not single:
            return 1
        go = self.work / "speed.go"
        go.unlink(missing_ok=True)
        procs, readies = [], []
        for index in range(2):
            path, ready = self.work / f"speed-{index}.json", self.work / f"speed-{index}.ready"
            path.unlink(missing_ok=True)
            ready.unlink(missing_ok=True)
            readies.append(ready)
            command = [
                sys.executable,
                "-m",
                "tiedlm.gpu_run",
                "speed",
                "--json",
                str(path),
                "--precision",
                report.get("precision", "fp32"),
                "--configs",
                str(self.configs),
                "--seconds",
                str(self.args.speed_seconds),
                "--ready",
                str(ready),
                "--go",
                str(go),
            ]
            if mode == "off":
                command.append("--eager")
            if self.args.dry_run:
                command.append("--dry-run")
            log = open(self.work / f"speed-{index}.log", "w", encoding="utf-8")  # noqa: SIM115
            procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), path, log))
        waited = _now()
        while not all(ready.exists() for ready in readies) and _now() - waited < 45:
            if any(proc.poll() is not None for proc, _, _ in procs):
                break
            time.sleep(0.05)
        go.write_text("go\n")  # both timed at once (or, if one never got ready, whatever ran)
        measured = []
        for proc, path, log in procs:
            try:
                proc.wait(timeout=self.args.speed_seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            if path.is_file():
                measured.append(json.loads(path.read_text()))
        verdict = self.summary["concurrency"] = concurrency_verdict(single, measured)
        rates = verdict["two_at_once_tok_s"]
        self.say(
            f"concurrency: one run {single:.0f} tok/s; two at once {' + '.join(f'{r:.0f}' for r in rates)} = "
            f"{sum(rates):.0f} tok/s ({verdict['gain']:.2f}x, timed {verdict['overlap']:.0%} side by side): "
            f"{verdict['jobs']} at a time"
        )
        return verdict["jobs"]

    def _subprocess(self, command: list[str], log_path: Path, timeout: float) -> int:
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.say(f"{command[3]}: stopped after {timeout:.0f} s")
                return 124

    # --- the queue ---

    def plans(self):
        from tiedlm.reproduce import plan

        wanted = [tuple(item.split("/")) for item in self.args.only.split(",")] if self.args.only else list(QUEUE)
        unknown = [item for item in wanted if item not in QUEUE]
        if unknown:
            raise SystemExit(f"gpu_run: --only: not in the queue: {unknown} (choose from {QUEUE})")
        return [
            plan(table, [variant], self.configs, self.runs)[0] for table, variant in QUEUE if (table, variant) in wanted
        ]

    def overrides(self, mode: str, precision: str) -> list[str]:
        overrides = [f"train.precision={precision}"]
        if mode != "auto":
            overrides.append(f"train.cuda_graph={mode}")
        if self.args.dry_run:
            overrides += [f"data.corpus={self.work / 'corpus'}", *DRY_OVERRIDES]
        return overrides

    def run_queue(self, jobs: int, mode: str, precision: str) -> None:
        from tiedlm.reproduce import train_command

        if self.args.dry_run:
            _write_tiny_corpus(self.work / "corpus")
        pending, running = self.plans(), {}
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        while pending or running:
            while pending and len(running) < jobs:
                item, left = pending[0], self.stop_at - _now()
                if left < (MIN_START_S if not self.args.dry_run else 1.0):
                    for later in pending:
                        self._record(later, "not started", None, 0.0, f"{left:.0f} s were left")
                    pending.clear()
                    break
                pending.pop(0)
                if item.finished:
                    self._record(item, "already finished", 0, 0.0, "")
                    continue
                limit_min = max(left - RUN_OVERHEAD_S, 6.0) / 60 + elapsed_minutes(item.run_dir)
                command = [
                    sys.executable,
                    "-m",
                    "tiedlm",
                    *train_command(
                        item, [*self.overrides(mode, precision), f"train.time_limit_minutes={limit_min:.3f}"]
                    ),
                ]
                item.run_dir.parent.mkdir(parents=True, exist_ok=True)
                log = open(item.run_dir.parent / f"{item.variant}.log", "a", encoding="utf-8")  # noqa: SIM115
                log.write(f"$ {' '.join(command)}\n")
                log.flush()
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[proc] = {"item": item, "began": _now(), "log": log, "terminated": False}
                self.say(
                    f"{item.table}/{item.variant}: started, time limit {limit_min:.1f} min "
                    f"({self.left():.0f} s left in the budget)"
                )
            now = _now()
            for proc, entry in running.items():
                if now >= self.stop_at and not entry["terminated"]:
                    entry["terminated"] = True
                    self.say(f"{entry['item'].table}/{entry['item'].variant}: deadline: SIGTERM (checkpoint, exit 143)")
                    proc.send_signal(signal.SIGTERM)
                elif now >= self.stop_at + STOP_GRACE_S and proc.poll() is None:
                    proc.kill()
            for proc in [p for p in running if p.poll() is not None]:
                entry = running.pop(proc)
                item, began, log = entry["item"], entry["began"], entry["log"]
                log.close()
                self._record(item, "exit", proc.returncode, _now() - began, "")
                self.pack()
            time.sleep(0.2)

    def _record(self, item, status: str, code: int | None, seconds: float, note: str) -> None:
        row = {"table": item.table, "variant": item.variant, "status": status, "exit": code, "wall_s": seconds}
        if note:
            row["note"] = note
        row.update(run_facts(item.run_dir))
        self.summary["runs"].append(row)
        if status == "exit":
            epochs = row.get("epochs", 0)
            result = (
                f"valid {row['valid_ppl']:.2f}, test {row['test_ppl']:.2f}, stopped by {row['stopped_by']}"
                if "valid_ppl" in row
                else "no final.json"
            )
            self.say(
                f"{item.table}/{item.variant}: exit {code} after {seconds:.0f} s, {epochs} epochs, {result}; "
                f"epoch {row.get('epoch_s', 0):.1f} s; windows {row.get('windows')}"
            )
        else:
            self.say(f"{item.table}/{item.variant}: {status}{f' ({note})' if note else ''}")

    # --- $OUT ---

    def collect_tables(self) -> None:
        """``tiedlm reproduce TABLE --collect-only`` for every table that has a run, into WORK/results."""
        from tiedlm.cli import main as tiedlm

        tables = sorted({row["table"] for row in self.summary["runs"] if row.get("epochs")})
        for table in tables:
            variants = [r["variant"] for r in self.summary["runs"] if r["table"] == table and r.get("epochs")]
            argv = [
                "reproduce",
                table,
                "--collect-only",
                "--runs",
                str(self.runs),
                "--results",
                str(self.work / "results"),
                "--configs",
                str(self.configs),
                "--variants",
                ",".join(variants),
            ]
            with open(self.work / f"collect-{table}.log", "w", encoding="utf-8") as log:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    try:
                        code = tiedlm(argv)
                    except Exception:  # noqa: BLE001 (the runs come back all the same)
                        traceback.print_exc()
                        code = 1
            self.summary.setdefault("collect", {})[table] = code
            self.say(f"collect {table}: {'ok' if code == 0 else f'failed (exit {code}), see collect-{table}.log'}")

    def pack(self, final: bool = False) -> None:
        try:
            files = pack_out(self.work, self.runs, self.out, self.summary, checkpoints=final)
            self.summary["out_files"] = files
        except Exception as error:  # noqa: BLE001 (never lose the run over the packing)
            self.say(f"packing failed: {_error_line(error)}")
            traceback.print_exc()

    def finish(self) -> None:
        self.collect_tables()
        self.summary["seconds"] = _now() - self.t0
        self.pack(final=True)
        self.pack(final=True)  # again, so that summary.json lists the files
        self.say(f"done in {self.summary['seconds']:.0f} s; $OUT: {', '.join(self.summary.get('out_files', []))}")
        for line in summary_table(self.summary):
            print(line)
        print(
            "collect: mkdir DIR && tar xzf runs.tar.gz -C DIR && "
            "tiedlm reproduce wikitext-2-medium --collect-only --runs DIR/runs"
        )


def concurrency_verdict(single: float, measured: list[dict[str, Any]]) -> dict[str, Any]:
    """Two runs at once where two workers timed side by side (≥ 80% of the time) trained ≥ 10% more
    tokens per second in all than one alone; else one at a time."""
    rates = [m["tok_s"] for m in measured]
    overlap = 0.0
    if len(measured) == 2:
        (a0, a1), (b0, b1) = ((m["start_wall"], m["end_wall"]) for m in measured)
        overlap = max(0.0, min(a1, b1) - max(a0, b0)) / max(a1 - a0, b1 - b0, 1e-9)
    gain = sum(rates) / single if len(rates) == 2 and single > 0 else 0.0
    jobs = 2 if gain >= 1.1 and overlap >= 0.8 else 1
    return {"single_tok_s": single, "two_at_once_tok_s": rates, "gain": gain, "overlap": overlap, "jobs": jobs}


def _write_tiny_corpus(root: Path, words: int = 1200, vocab: int = 30, seed: int = 0) -> None:
    """A small patterned corpus with <unk> (the dry run's data)."""
    rng = random.Random(seed)
    lexicon = [f"w{i}" for i in range(vocab)] + ["<unk>"]

    def text(n: int) -> str:
        lines, line = [], []
        for _ in range(n):
            line.append(lexicon[(len(line) * 3 + rng.randrange(3)) % len(lexicon)])
            if len(line) >= rng.randrange(4, 12):
                lines.append(" ".join(line))
                line = []
        return "\n".join(lines + [" ".join(line)]) + "\n"

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(text(words) + " ".join(lexicon) + "\n")
    (root / "valid.txt").write_text(text(words // 5))
    (root / "test.txt").write_text(text(words // 5))


# --- command line --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tiedlm.gpu_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "selfcheck", "speed"))
    parser.add_argument("--dry-run", action="store_true", help="everything on the CPU, on a tiny corpus")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds from the script's start to the last file written",
    )
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--jobs", type=int, default=0, help="runs at once (default: from the self-check)")
    parser.add_argument("--only", default="", help="comma-separated TABLE/VARIANT of the queue to train")
    parser.add_argument("--work", default=os.environ.get("GPU_RUN_WORK", "/tmp/gpu-run"))
    parser.add_argument("--out", default=os.environ.get("OUT", ""))
    parser.add_argument("--configs", default="configs")
    parser.add_argument("--speed-seconds", "--seconds", dest="speed_seconds", type=float, default=3.0)
    parser.add_argument("--json", help="selfcheck/speed: write the report here")
    parser.add_argument("--ready", help="speed: write this file when warmed up ...")
    parser.add_argument("--go", help="speed: ... and start timing once this file exists")
    parser.add_argument("--eager", action="store_true", help="speed: time the eager step")
    return parser


def _save_json(path: str | None, report: dict[str, Any]) -> None:
    if path:
        write_atomic(Path(path), (json.dumps(report, indent=2, default=str) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.mode in ("selfcheck", "speed"):
        if args.mode == "selfcheck":
            report = selfcheck(args, save=lambda report: _save_json(args.json, report))
        else:
            from tiedlm.precision import resolve_precision

            device = _device(args.dry_run)
            report = measure_speed(
                Path(args.configs) / SPEED_CONFIG,
                device,
                resolve_precision(args.precision, device)[0],
                not args.eager,
                args.speed_seconds,
                dry_run=args.dry_run,
                ready=Path(args.ready) if args.ready else None,
                go=Path(args.go) if args.go else None,
            )
        _save_json(args.json, report)
        print(json.dumps(report, indent=2, default=str))
        return 0
    if not args.out:
        args.out = str(Path(args.work) / "out")
    return Driver(args).main()


if __name__ == "__main__":
    sys.exit(main())
