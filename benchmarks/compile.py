"""Does ``train.compile = true`` (torch.compile of the model's forward) pay off on this machine?

    python benchmarks/compile.py              # ~6 min on 2 cores

`tiedlm bench` of PTB small REAL, eager and compiled, for the speed paths that
matter (bf16 with exact and fast VD masks, fp32 exact), no naive reference.
Compilation happens in the warm-up windows; the wall time of each bench
includes it. Only training goes through the compiled forward.
Results: benchmarks/compile.json and benchmarks/COMPILE.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from record import header, record, write

from tiedlm.bench import bench
from tiedlm.config import load_config
from tiedlm.runtime import tune_allocator

ROOT = Path(__file__).resolve().parents[1]
PATHS = [("bf16", "fast"), ("bf16", "exact"), ("fp32", "exact")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=15)
    parser.add_argument("--config", default="configs/ptb/small-real.toml")
    args = parser.parse_args()
    tune_allocator()
    began = time.perf_counter()
    rows = []
    for precision, mode in PATHS:
        for compiled in (False, True):
            overrides = [f"train.precision={precision}", f"model.dropout_mode={mode}", "train.device=cpu",
                         f"train.compile={str(compiled).lower()}"]  # fmt: skip
            config = load_config(ROOT / args.config, overrides)
            start = time.perf_counter()
            report = bench(config, windows=args.windows, warmup=3, reference=False)
            report["compile"] = compiled
            report["wall_s"] = time.perf_counter() - start
            print(json.dumps(report), flush=True)
            rows.append(report)
    result = record("compile.py", began, rows=rows)
    lines = header(result, "torch.compile on this CPU", "compile.json", rows[0]["threads"])
    lines += [
        f"`tiedlm bench {args.config}`, median of {args.windows} timed training windows after 3 warm-up",
        "windows (which include the compilation; the bench's wall time includes it too).",
        "",
        "| precision | VD mode | eager train tok/s | compiled train tok/s | speed-up | compiled bench wall s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for index in range(0, len(rows), 2):
        eager, compiled = rows[index], rows[index + 1]
        lines.append(
            f"| {eager['precision']} | {eager['dropout_mode']} | {eager['train_tokens_per_s']:,.0f} "
            f"| {compiled['train_tokens_per_s']:,.0f} "
            f"| {compiled['train_tokens_per_s'] / eager['train_tokens_per_s']:.2f}x | {compiled['wall_s']:.0f} |"
        )
    lines.append("")
    write(result, "compile.json", "COMPILE.md", "\n".join(lines))


if __name__ == "__main__":
    main()
