"""fp32 on an AVX2-only CPU (issue 18 point 4, issue 20 point 3): the exact-mask path against the
naive reference, like for like, measured in the same process, interleaved.

    python benchmarks/avx2.py                        # ~15 min on a 2-core machine
    python benchmarks/avx2.py --baseline e96aa3a     # also the same cases at an older commit

Runs every case in a child process with the CPU capped to AVX2 (interleaved.AVX2_CAPS:
ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, TIEDLM_CPU_ISA), unless --no-caps:

- PTB medium RE (`configs/ptb/medium-re.toml`: exact masks, no AL) against the naive tied
  reference (`nn.LSTM` + plain dropout + cross-entropy, no AL): the like-for-like ratio;
- WikiText-2 medium REAL (exact masks, trainable AL target) against the bench's own naive
  reference (the AL from its definition);

each on 1 thread and, with --threads 1,2, on 2. Results: benchmarks/avx2.json and benchmarks/AVX2.md.
"""

from __future__ import annotations

import argparse
import time

from interleaved import AVX2_CAPS, add_options, run_case, sources
from record import header, record, write

CASES = [  # config, overrides, what the reference is
    ("configs/ptb/medium-re.toml", [], "naive tied nn.LSTM, no AL (like for like)"),
    ("configs/wikitext-2/medium-real.toml", [], "naive tied nn.LSTM + AL from its definition"),
]


def render(result: dict) -> str:
    lines = header(result, "fp32 on AVX2: the exact-mask path against the naive reference", "avx2.json",
                   result["threads"][-1])  # fmt: skip
    rows = result["rows"]
    lines += [
        f"CPU features as tiedlm sees them: `{rows[0]['cpu_features']}`"
        + (
            f" (AVX2 emulated by caps on this CPU: `{' '.join(f'{k}={v}' for k, v in result['caps'].items())}`)"
            if result["caps"]
            else ""
        ),  # fmt: skip
        "",
        "Each row is one process: tiedlm's training step and the naive reference on the same batches,",
        f"alternating every {rows[0]['timed_windows'] // result['rounds']} windows for {result['rounds']} rounds "
        "(median per window). *CPU* rates divide by the process's CPU time, *wall* rates by the wall",
        "clock. The machine is a shared 2-core VM: the load-average column (1-minute, when the case",
        "started) says how busy it was, near 1 meaning this process alone; under load the wall clock also",
        "counts other processes' time, and with one thread the CPU-time rate is the fair one. The ratio,",
        "measured side by side, is what the goal is about. With `--repeats`, each case runs in that many",
        "processes one after another; their spread is the machine's noise.",
        "",
        "| config | source | threads | tiedlm tok/s (CPU) | naive tok/s (CPU) | ratio (CPU) | tiedlm tok/s (wall) "
        "| naive tok/s (wall) | ratio (wall) | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['source_label']} | {r['threads']} | {r['tiedlm_tok_s_cpu']:,.0f} "
            f"| {r['naive_tok_s_cpu']:,.0f} | **{r['ratio_cpu']:.2f}x** | {r['tiedlm_tok_s_wall']:,.0f} "
            f"| {r['naive_tok_s_wall']:,.0f} | {r['ratio_wall']:.2f}x | {r['load_average'][0]:.1f} |"
        )
    lines += ["", "References: " + "; ".join(f"{c.split('/')[-1]}: {what}" for c, _, what in CASES) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, rounds=4)
    parser.add_argument("--no-caps", action="store_true", help="measure the CPU as it is")
    parser.add_argument("--repeats", type=int, default=1, help="processes per case (the spread shows the noise)")
    args = parser.parse_args()
    began = time.perf_counter()
    caps = {} if args.no_caps else AVX2_CAPS
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for count in threads:
        for config, overrides, _ in CASES:
            for source, label in sources(args) * args.repeats:
                row = run_case(config, overrides, threads=count, caps=caps, source=source, windows=args.windows,
                               rounds=args.rounds, reference=True)  # fmt: skip
                row["source_label"] = label
                print(f"{row['config']} {label} {count} thread(s): {row['ratio_cpu']:.2f}x (CPU), "
                      f"{row['ratio_wall']:.2f}x (wall)", flush=True)  # fmt: skip
                rows.append(row)
    result = record("avx2.py", began, threads=threads, rounds=args.rounds, repeats=args.repeats, caps=caps, rows=rows)
    write(result, "avx2.json", "AVX2.md", render(result))


if __name__ == "__main__":
    main()
