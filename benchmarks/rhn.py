"""RHN speed: `tiedlm bench` on the Variational RHN against a naive reference of the same cell,
and what a full PTB run of the paper-size RHN costs on this machine.

    python benchmarks/rhn.py                   # ~5 min on 2 cores

For configs/ptb/rhn-re.toml (depth 10, 830 units; also rhn-real with AL) and a
smaller RHN (depth 5, 400 units), in fp32 and bf16: median training tokens/s
over timed BPTT windows, the naive reference (separate H and T products per
micro-step, autograd through the loop) on the same batches, evaluation
tokens/s, and seconds per PTB epoch = 929,589 tokens / (training tokens/s) +
the validation split at the evaluation rate. Results: benchmarks/rhn.json
and benchmarks/RHN.md.
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
PTB_TRAIN, PTB_VALID = 929_589, 73_760
CASES = [
    ("rhn-re", []),
    ("rhn-real", []),
    ("rhn-re", ["model.depth=5", "model.hidden_size=400"]),
]


def measure(windows: int, precisions: list[str]) -> list[dict]:
    rows = []
    for name, overrides in CASES:
        for precision in precisions:
            config = load_config(ROOT / "configs" / "ptb" / f"{name}.toml",
                                 [*overrides, f"train.precision={precision}", "train.device=cpu"])  # fmt: skip
            report = bench(config, windows=windows, warmup=2, reference=True)
            report["overrides"] = overrides
            report["depth"] = config.model.depth
            report["epoch_s"] = PTB_TRAIN / report["train_tokens_per_s"] + PTB_VALID / report["eval_tokens_per_s"]
            print(json.dumps(report), flush=True)
            rows.append(report)
    return rows


def render(result: dict) -> str:
    lines = header(result, "Variational RHN: speed on this machine", "rhn.json", result["rows"][0]["threads"])
    lines += [
        "Median over timed BPTT windows (batch 20 × 35) after 2 warm-up windows. The reference is the same",
        "cell written naively (separate H and T products per micro-step, autograd through the loop, fp32)",
        "on the same batches. An epoch is PTB train at the training rate plus PTB valid at the evaluation rate.",
        "",
        "| config | depth × units | precision | train tok/s | reference tok/s | ratio | GFLOP/s (of peak) "
        "| eval tok/s | s / epoch | 500 epochs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        name = row["config"] + (" (smaller)" if row["overrides"] else "")
        lines.append(
            f"| {name} | {row['depth']} × {row['hidden_size']} | {row['precision']} "
            f"| {row['train_tokens_per_s']:,.0f} | {row['reference_train_tokens_per_s']:,.0f} "
            f"| {row['speedup_over_reference']:.2f}x | {row['achieved_gflops']:.0f} ({row['fraction_of_peak']:.0%}) "
            f"| {row['eval_tokens_per_s']:,.0f} | {row['epoch_s']:,.0f} | {500 * row['epoch_s'] / 86400:.1f} days |"
        )
    lines += [
        "",
        "Zilly et al. train the paper-size RHN for 500+ epochs; the last column is what that costs here.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    tune_allocator()
    began = time.perf_counter()
    rows = measure(args.windows, args.precisions.split(","))
    result = record("rhn.py", began, rows=rows)
    write(result, "rhn.json", "RHN.md", render(result))


if __name__ == "__main__":
    main()
