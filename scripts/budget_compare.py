"""Train several configs on the same wall-clock budget, side by side, and write a comparison.

    python scripts/budget_compare.py rhn-vs-lstm configs/ptb/rhn-small-re.toml configs/ptb/lstm-370-re.toml \\
        --minutes 60 --jobs 2
    python scripts/budget_compare.py transformer configs/ptb/transformer-re.toml \\
        configs/ptb/transformer-real.toml --minutes 45 --jobs 2

Each config trains with ``train.time_limit_minutes`` (no epoch starts that would
end past the budget) into ``runs/NAME/CONFIG-NAME``, ``--jobs`` at a time with
the cores split between them; finished runs are collected, interrupted ones
resumed. ``results/NAME.md`` (+ ``.json``, ``.png`` of training and validation perplexity
against wall time and epochs) is written from the run logs, which are copied to
``results/NAME/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(configs: list[Path], runs: Path, minutes: float, jobs: int, overrides: list[str]) -> None:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    pending, running = list(configs), []
    while pending or running:
        while pending and len(running) < jobs:
            config = pending.pop(0)
            run = runs / config.stem
            if (run / "final.json").is_file():
                print(f"{run}: finished earlier, collected", flush=True)
                continue
            settings = [f"train.time_limit_minutes={minutes}", *overrides]
            if (run / "checkpoints").is_dir():
                command = ["train", "--resume", str(run)]
            else:
                command = ["train", str(config), "--out", str(run)]
            for item in settings:
                command += ["--set", item]
            runs.mkdir(parents=True, exist_ok=True)
            log = open(runs / f"{config.stem}.log", "a")  # noqa: SIM115 (closed when the run ends)
            print(f"training: tiedlm {' '.join(command)}", flush=True)
            proc = subprocess.Popen([sys.executable, "-m", "tiedlm", *command], env=env, stdout=log, stderr=log)
            running.append((config, proc, log))
        config, proc, log = running.pop(0)
        code = proc.wait()
        log.close()
        print(f"{config.stem}: exit {code}", flush=True)


def render(name: str, configs: list[Path], runs: Path, out: Path, minutes: float) -> None:
    from tiedlm.plot import plot_curves
    from tiedlm.reproduce import count_parameters

    logs = out / name
    logs.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for config in configs:
        run = runs / config.stem
        if not (run / "metrics.jsonl").is_file():
            continue
        metrics = [m for m in read_jsonl(run / "metrics.jsonl") if "valid_ppl" in m]
        curves[config.stem] = metrics
        info = json.loads((run / "run.json").read_text())
        saved = json.loads((run / "config.json").read_text())
        final = json.loads((run / "final.json").read_text()) if (run / "final.json").is_file() else None
        vocab = len((run / "best" / "vocab.txt").read_text().split())
        shutil.copyfile(run / "metrics.jsonl", logs / f"{config.stem}.jsonl")
        shutil.copyfile(run / "run.json", logs / f"{config.stem}.run.json")
        rows.append(
            {
                "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
                "name": config.stem,
                "architecture": saved["model"]["architecture"],
                "augmented": saved["loss"]["augmented"],
                "params": count_parameters(saved, vocab),
                "epochs": metrics[-1]["epoch"],
                "wall_s": metrics[-1]["elapsed_s"],
                "best_valid": min(m["valid_ppl"] for m in metrics),
                "valid": final["valid_ppl"] if final else None,
                "test": final["test_ppl"] if final else None,
                "stopped_by": final["stopped_by"] if final else "in progress",
                "tokens_per_s": sum(m["train_tokens_per_s"] for m in metrics) / len(metrics),
                "hardware": info.get("hardware"),
                "commit": info.get("commit"),
                "command": " ".join(["tiedlm", *info["command"][1:]]),
                "resumed": [" ".join(["tiedlm", *r["command"][1:]]) for r in info.get("resumed", [])],
                "curve": [
                    {
                        "epoch": m["epoch"],
                        "minutes": m["elapsed_s"] / 60,
                        "valid_ppl": m["valid_ppl"],
                        "train_ppl": m["train_ppl"],
                    }
                    for m in metrics
                ],  # fmt: skip
                "log": f"{name}/{config.stem}.jsonl",
            }
        )
    if not rows:
        raise SystemExit(f"{name}: no run has finished an epoch under {runs}")
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_curves([(f"{row['name']} ({row['params'] / 1e6:.1f}M)", curves[row["name"]]) for row in rows],
                out / f"{name}.png")  # fmt: skip

    def ppl(value):
        return "—" if value is None else f"{value:.2f}"

    lines = [
        f"# {name}: equal wall-clock budgets ({minutes:g} minutes each)",
        "",
        f"Generated by `python scripts/budget_compare.py {name} ... --render-only` from the logs in",
        f"[`{name}/`]({name}/) (do not edit by hand; numbers in [`{name}.json`]({name}.json)). Each run had",
        f"`train.time_limit_minutes = {minutes:g}`: no epoch starts that would end past the budget. Valid/test",
        "are of the best-validation checkpoint.",
        "",
        f"![training (dashed) and validation perplexity against epochs and wall time]({name}.png)",
        "",
        "| run | architecture | AL | parameters | epochs | wall | train tok/s | best valid | valid | test "
        "| stopped by |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['architecture']} | {'yes' if row['augmented'] else 'no'} "
            f"| {row['params'] / 1e6:.2f}M | {row['epochs']} | {row['wall_s'] / 60:.0f} min "
            f"| {row['tokens_per_s']:,.0f} | {row['best_valid']:.2f} | {ppl(row['valid'])} | {ppl(row['test'])} "
            f"| {row['stopped_by']} |"
        )
    lines += ["", "## Runs", ""]
    for row in rows:
        lines.append(f"- {row['name']}: `{row['command']}` — {row['hardware']}, commit `{(row['commit'] or '?')[:8]}`, "
                     f"log [{row['name']}.jsonl]({row['log']})")  # fmt: skip
        lines += [f"  - resumed: `{r}`" for r in row["resumed"]]
    lines.append("")
    (out / f"{name}.md").write_text("\n".join(lines))
    print(f"wrote {out / name}.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    configs = [c.resolve() for c in args.configs]
    runs = args.runs / args.name
    if not args.render_only:
        train(configs, runs, args.minutes, args.jobs, args.overrides)
    render(args.name, configs, runs, args.out, args.minutes)


if __name__ == "__main__":
    main()
