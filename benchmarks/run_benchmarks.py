"""Speed and accuracy-cost measurements behind benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run_benchmarks.py            # everything (~20 min on 2 cores)

1. `tiedlm bench` on PTB small and medium REAL for each speed path
   (precision fp32/bf16 × VD dropout exact/fast, and `train.compile = true`
   on the fastest and the default path), with the naive reference.
2. Evaluation of the whole PTB test set with batch size 1 (medium and small;
   random weights: the time does not depend on them).
3. The perplexity cost of each speed path: PTB small REAL trained for a fixed
   short budget (same seed, same windows) in each variant.
Raw numbers go to benchmarks/results.json; the tables to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from tiedlm.bench import bench
from tiedlm.config import load_config
from tiedlm.data import load_corpus
from tiedlm.evaluate import evaluate
from tiedlm.models import build_model
from tiedlm.runtime import cpu_name, git_commit, tune_allocator
from tiedlm.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [("fp32", "exact"), ("fp32", "fast"), ("bf16", "exact"), ("bf16", "fast")]
COMPILED = [("fp32", "exact"), ("bf16", "fast")]  # also timed with train.compile = true


def speed(config_path: Path, windows: int) -> list[dict]:
    rows = []
    paths = [(*path, False) for path in VARIANTS] + [(*path, True) for path in COMPILED]
    for precision, mode, compiled in paths:
        config = load_config(config_path, [f"train.precision={precision}", f"model.dropout_mode={mode}",
                                           f"train.compile={str(compiled).lower()}", "train.device=cpu"])  # fmt: skip
        report = bench(config, windows=windows, warmup=3, reference=True)
        print(json.dumps(report), flush=True)
        rows.append(report)
    return rows


def eval_bs1(config_path: Path) -> dict:
    config = load_config(config_path, ["train.device=cpu"])
    corpus = load_corpus(config.data.corpus)
    torch.manual_seed(config.seed)
    model = build_model(config.model, len(corpus.vocab))
    row = {"config": config.name}
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        result = evaluate(model, corpus.test, 1, config.data.bptt, precision)
        row[f"{precision}_s"] = time.perf_counter() - start
        row["tokens"] = result.tokens
    print(json.dumps(row), flush=True)
    return row


def accuracy_cost(config_path: Path, steps: int, epochs: int) -> list[dict]:
    rows = []
    for precision, mode in VARIANTS:
        overrides = [f"train.precision={precision}", f"model.dropout_mode={mode}", f"train.max_epochs={epochs}",
                     f"train.max_steps_per_epoch={steps}", "train.device=cpu"]  # fmt: skip
        config = load_config(config_path, overrides)
        with tempfile.TemporaryDirectory() as run, contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            report = Trainer(config, Path(run) / "run", echo=lambda *a: None).fit()
            wall = time.perf_counter() - start
            metrics = [json.loads(x) for x in (Path(run) / "run" / "metrics.jsonl").read_text().splitlines()]
        row = {"precision": precision, "dropout_mode": mode, "valid_ppl": report["valid_ppl"],
               "test_ppl": report["test_ppl"], "train_tokens_per_s": metrics[-1]["train_tokens_per_s"],
               "wall_s": wall, "overrides": overrides}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--steps", type=int, default=400, help="windows per epoch in the accuracy runs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = parser.parse_args()
    tune_allocator()  # as the `tiedlm` command does
    if args.render_only:
        results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
        (ROOT / "benchmarks" / "RESULTS.md").write_text(render(results))
        return
    started = time.perf_counter()
    results = {
        "command": " ".join(["python", *sys.argv]),
        "commit": git_commit(),
        "dirty": bool(
            subprocess.run(
                ["git", "status", "--porcelain", "src"], capture_output=True, text=True, cwd=ROOT
            ).stdout.strip()
        ),  # fmt: skip
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "speed": speed(ROOT / "configs/ptb/small-real.toml", args.windows)
        + speed(ROOT / "configs/ptb/medium-real.toml", args.windows),
        "eval_test_bs1": [
            eval_bs1(ROOT / "configs/ptb/small-real.toml"),
            eval_bs1(ROOT / "configs/ptb/medium-real.toml"),
        ],  # fmt: skip
    }
    if not args.skip_accuracy:
        results["accuracy"] = {
            "config": "configs/ptb/small-real.toml",
            "steps_per_epoch": args.steps,
            "epochs": args.epochs,
            "seed": 1,
            "rows": accuracy_cost(ROOT / "configs/ptb/small-real.toml", args.steps, args.epochs),
        }
    results["wall_s"] = time.perf_counter() - started
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / "benchmarks" / "RESULTS.md").write_text(render(results))


SPEED_HEADER = (
    "| config | precision | VD mode | compile | train tok/s | reference tok/s | ratio | GFLOP/s (of peak) "
    "| eval tok/s (batch 10) | peak RSS MB |"
)


def _path(row: dict) -> str:
    return f"{row['precision']}, {row['dropout_mode']}" + (", compile" if row.get("compile") else "")


def targets(r: dict) -> str:
    """The issue's CPU targets next to the best measured variant."""
    best = {}
    for row in r["speed"]:
        if row["config"] not in best or row["train_tokens_per_s"] > best[row["config"]]["train_tokens_per_s"]:
            best[row["config"]] = row
    medium_eval = next(e for e in r["eval_test_bs1"] if e["config"] == "ptb-medium-real")
    lines = ["| target | measured (best variant) | met |", "|---|---|---|"]
    for config, goal in (("ptb-medium-real", 3000), ("ptb-small-real", 14000)):
        row = best[config]
        lines.append(
            f"| {config} training ≥ {goal:,} tok/s | {row['train_tokens_per_s']:,.0f} "
            f"({_path(row)}) | {'yes' if row['train_tokens_per_s'] >= goal else 'no'} |"
        )
        lines.append(
            f"| {config} ≥ 2x the naive reference | {row['speedup_over_reference']:.2f}x | "
            f"{'yes' if row['speedup_over_reference'] >= 2 else 'no'} |"
        )
    fastest = min(medium_eval["fp32_s"], medium_eval["bf16_s"])
    lines.append(f"| PTB test, batch 1, medium < 60 s | {fastest:.1f} s | {'yes' if fastest < 60 else 'no'} |")
    lines += ["", "Where the time of a training step goes, operator by operator, and what bounds it:",
              "[PROFILE.md](PROFILE.md) (`python benchmarks/profile_step.py`)."]  # fmt: skip
    return "### Targets on this CPU\n\n" + "\n".join(lines)


def render(r: dict) -> str:
    speed_rows = "\n".join(
        f"| {s['config']} | {s['precision']} | {s['dropout_mode']} | {'yes' if s.get('compile') else 'no'} "
        f"| {s['train_tokens_per_s']:,.0f} | "
        f"{s['reference_train_tokens_per_s']:,.0f} | {s['speedup_over_reference']:.2f}x | "
        f"{s['achieved_gflops']:.0f} ({s['fraction_of_peak']:.0%}) | {s['eval_tokens_per_s']:,.0f} | "
        f"{s['peak_memory_mb']:,.0f} |"
        for s in r["speed"]
    )
    peak = r["speed"][0]["matmul_peak_gflops"]
    evals = "\n".join(
        f"| {e['config']} | {e['tokens']:,} | {e['fp32_s']:.1f} | {e['bf16_s']:.1f} |" for e in r["eval_test_bs1"]
    )
    text = f"""# Benchmarks

Generated by `benchmarks/run_benchmarks.py` (do not edit by hand; raw numbers in
[`results.json`](results.json)).

- command: `{r["command"]}`
- commit: `{r["commit"]}`{" (with uncommitted changes under src/)" if r["dirty"] else ""}, date {r["date"]}
- machine: {r["cpu"]}, {r["threads"]} threads; PyTorch {r["torch"]}
- measured matmul peak (2048², best of 6): fp32 {peak["fp32"]:.0f} GFLOP/s, bf16 {peak["bf16"]:.0f} GFLOP/s
- total wall time {r["wall_s"] / 60:.1f} min

## Training and evaluation speed (`tiedlm bench`)

Median over timed BPTT windows (batch 20 × 35) after 3 warm-up windows. The
reference is the same model written naively (`nn.LSTM` + `nn.Linear` +
`F.cross_entropy`, fp32, plain dropout, the augmented loss from its
definition) on the same batches. GFLOP/s counts matrix products only; the
fraction is of the measured peak of the run's precision. "compile" is
`train.compile = true`: the augmented loss's (tokens × |V|) work fused by
`torch.compile` (`tiedlm/loss/compiled.py`; the compilation happens in the warm-up windows).
Peak RSS is the benchmark process's high-water mark, which only grows from row to
row (all rows run in one process); `benchmarks/LARGE_VOCAB.md` measures memory
with one process per case.

{SPEED_HEADER}
|---|---|---|---|---:|---:|---:|---:|---:|---:|
{speed_rows}

{targets(r)}

A fraction of peak near or above 100% means the run's products went at least as
fast as the 2048² reference product when it was timed (this VM's clock varies
between measurements); it is not a miscount: the FLOP formula is in
`src/tiedlm/bench.py`.

## PTB test set, batch size 1

| config | tokens | fp32 s | bf16 s |
|---|---:|---:|---:|
{evals}
"""
    if "accuracy" in r:
        a = r["accuracy"]
        rows = "\n".join(
            f"| {x['precision']} | {x['dropout_mode']} | {x['valid_ppl']:.2f} | {x['test_ppl']:.2f} | "
            f"{x['train_tokens_per_s']:,.0f} | {x['wall_s']:.0f} |"
            for x in a["rows"]
        )
        text += f"""
## What the speed paths cost in perplexity

`{a["config"]}` (PTB small REAL), seed {a["seed"]}, {a["epochs"]} epochs of
{a["steps_per_epoch"]} windows each (a fixed short budget, far from
convergence), evaluated with batch size 10. Differences between rows are
the cost (or noise) of the setting, not final perplexities.

| precision | VD mode | valid ppl | test ppl | train tok/s | wall s |
|---|---|---:|---:|---:|---:|
{rows}
"""
    return text


if __name__ == "__main__":
    main()
