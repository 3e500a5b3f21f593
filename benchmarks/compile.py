"""Does ``train.compile = true`` pay off on this machine, and ``train.compile_model = true``?

    python benchmarks/compile.py              # ~4 min on 2 cores

`tiedlm bench` of PTB small REAL for the speed paths that matter (bf16 with
fast and exact VD masks, fp32 exact), no naive reference, three ways: eager;
`compile` (the augmented loss's (tokens x |V|) work fused by torch.compile,
tiedlm/loss/compiled.py); and `compile` + `compile_model` (the model's forward
compiled too). Compilation happens in the warm-up windows; the wall time of
each bench includes it. Results: benchmarks/compile.json and benchmarks/COMPILE.md.
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
SETTINGS = {"eager": (False, False), "compile": (True, False), "compile + compile_model": (True, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=15)
    parser.add_argument("--config", default="configs/ptb/small-real.toml")
    args = parser.parse_args()
    tune_allocator()
    began = time.perf_counter()
    rows = []
    for precision, mode in PATHS:
        for setting, (loss, model) in SETTINGS.items():
            overrides = [f"train.precision={precision}", f"model.dropout_mode={mode}", "train.device=cpu",
                         f"train.compile={str(loss).lower()}", f"train.compile_model={str(model).lower()}"]  # fmt: skip
            config = load_config(ROOT / args.config, overrides)
            start = time.perf_counter()
            report = bench(config, windows=args.windows, warmup=3, reference=False)
            report["setting"] = setting
            report["wall_s"] = time.perf_counter() - start
            print(json.dumps(report), flush=True)
            rows.append(report)
    result = record("compile.py", began, rows=rows)
    lines = header(result, "torch.compile on this CPU", "compile.json", rows[0]["threads"])
    lines += [
        f"`tiedlm bench {args.config}`, median of {args.windows} timed training windows after 3 warm-up",
        "windows (which include the compilation; the bench's wall time includes it too). `compile` is",
        "`train.compile = true` (the augmented loss's fused kernels), `+ model` adds",
        "`train.compile_model = true` (the forward compiled too).",
        "",
        "| precision | VD mode | eager tok/s | compile tok/s | speed-up | compile + model tok/s | speed-up "
        "| compile + model bench wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for index in range(0, len(rows), len(SETTINGS)):
        eager, loss, both = rows[index : index + len(SETTINGS)]
        rate = eager["train_tokens_per_s"]
        lines.append(
            f"| {eager['precision']} | {eager['dropout_mode']} | {rate:,.0f} "
            f"| {loss['train_tokens_per_s']:,.0f} | {loss['train_tokens_per_s'] / rate:.2f}x "
            f"| {both['train_tokens_per_s']:,.0f} | {both['train_tokens_per_s'] / rate:.2f}x | {both['wall_s']:.0f} |"
        )
    lines.append("")
    write(result, "compile.json", "COMPILE.md", "\n".join(lines))


if __name__ == "__main__":
    main()
