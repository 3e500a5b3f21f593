"""Where a training step's time goes: torch.profiler over tiedlm's step and the naive reference.

    python benchmarks/profile_step.py          # ~4 min on 2 cores
    python benchmarks/profile_step.py --case configs/wikitext-2/medium-real.toml:bf16:exact --out profile_wt2

Explains the CPU targets of benchmarks/RESULTS.md. For each case (PTB small REAL
on the fastest path, bf16 + fast VD, eager and with `train.compile = true`, and on
the configs' default path, fp32 + exact VD; PTB medium REAL bf16 + fast, eager and
compiled) it

1. times training windows without the profiler (median, as `tiedlm bench`);
2. profiles further windows of tiedlm's TrainingStep and of the naive reference
   (`tiedlm.bench.naive_step`) on the same batches, and sorts each operator's own
   time into: matrix products; element-wise work on (tokens x |V|) arrays
   (softmaxes, exp/log, the KL, their gradients); optimizer and clipping; the rest
   (LSTM gates, dropout masks, embedding, copies); and the time between operators
   (Python and dispatch);
3. measures the machine's memory bandwidth (an fp32 add of (tokens x |V|) arrays),
   which bounds the element-wise work, and the matmul peak, which bounds the products.

Results: benchmarks/profile.json and benchmarks/PROFILE.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from record import header, record, write
from torch.profiler import ProfilerActivity, profile, record_function

from tiedlm.bench import matmul_peak_gflops, naive_step, time_windows, training_flops_per_token, workload
from tiedlm.config import load_config
from tiedlm.precision import cpu_features
from tiedlm.runtime import frozen_heap, tune_allocator
from tiedlm.training import PHASES

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # config, precision, VD mode, train.compile
    ("configs/ptb/small-real.toml", "bf16", "fast", False),
    ("configs/ptb/small-real.toml", "bf16", "fast", True),
    ("configs/ptb/small-real.toml", "fp32", "exact", False),
    ("configs/ptb/medium-real.toml", "bf16", "fast", False),
    ("configs/ptb/medium-real.toml", "bf16", "fast", True),
]
MATMULS, VOCAB, OPTIMIZER, CASTS, OTHER, BETWEEN = CATEGORIES = (
    "matrix products",
    "(tokens x |V|) element-wise",
    "optimizer and clipping",
    "dtype casts and copies",
    "other operators",
    "between operators (Python, dispatch)",
)
CAST_OPERATORS = ("aten::copy_", "aten::_to_copy", "aten::to")
PRODUCTS = ("::mm", "::addmm", "::bmm", "::baddbmm", "::addmv", "::mv", "::_addmm_activation")


def is_product(name: str) -> bool:
    """aten's products, oneDNN's fused RNN and its pre-packed linear (the exact recurrence's step products)."""
    return (
        name.endswith(PRODUCTS) or "mkldnn_rnn" in name or "mkldnn_linear" in name or name.endswith("_linear_pointwise")
    )


WINDOW = "profile.window"
COMPILED = "CompiledFxGraph"


def phase_of(event) -> str | None:
    while event is not None:
        if event.name in PHASES:
            return event.name
        event = event.cpu_parent
    return None


def window_of(event):
    while event is not None and event.name != WINDOW:
        event = event.cpu_parent
    return event


def profile_windows(run_window, batches, shapes: bool) -> list[list]:
    """Each window's operator events in order. ``record_shapes`` slows this machine's operators
    several-fold, so times come from a trace without shapes and shapes from a separate one."""
    with frozen_heap(), profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as trace:
        for inputs, targets in batches:
            with record_function(WINDOW):
                run_window(inputs, targets)
    windows: dict[int, list] = {}
    for event in trace.events():
        window = event if event.name == WINDOW else window_of(event.cpu_parent)
        if window is not None:
            windows.setdefault(id(window), []).append(event)
    return [sorted(events, key=lambda e: e.time_range.start) for events in windows.values()]


def vocab_wide(event, vocab_size: int) -> bool:
    return any(len(shape) >= 2 and shape[-1] == vocab_size for shape in event.input_shapes or [])


def categorise(windows: list[list], shaped: list, vocab_size: int) -> tuple[dict, list[dict]]:
    """Milliseconds per window in each category, and the operators by their own time.

    ``shaped`` is one window traced with shapes: the k-th event of every timed window is the
    same operator (a window runs the same code), so it says which events are (tokens x |V|).
    """
    names = [event.name for event in shaped]
    # The fused loss of train.compile = true: its (tokens x |V|) kernels run as one compiled graph.
    wide = [COMPILED in event.name or vocab_wide(event, vocab_size) for event in shaped]
    totals = dict.fromkeys(CATEGORIES, 0.0)
    operators: dict[tuple[str, bool], float] = {}
    matched = [events for events in windows if [event.name for event in events] == names]
    if not matched:
        raise RuntimeError("profiled windows ran different operators from the shaped window")
    for events in matched:
        for event, is_wide in zip(events, wide, strict=True):
            own = event.self_cpu_time_total / 1000 / len(matched)  # µs over all windows -> ms per window
            if event.name in PHASES or event.name == WINDOW:
                totals[BETWEEN] += own
                continue
            phase = phase_of(event)
            if phase is None:
                continue
            if is_product(event.name):
                category = MATMULS
            elif phase in PHASES[2:]:
                category = OPTIMIZER
            elif event.name in CAST_OPERATORS:
                category = CASTS
            elif is_wide:
                category = VOCAB
            else:
                category = OTHER
            totals[category] += own
            key = ("compiled loss kernels (torch.compile)" if COMPILED in event.name else event.name, is_wide)
            operators[key] = operators.get(key, 0.0) + own
    ranked = sorted(operators.items(), key=lambda item: -item[1])
    rows = [{"operator": name, "vocab_wide": is_wide, "ms_per_window": ms} for (name, is_wide), ms in ranked]
    return totals | {"profiled window ms": sum(totals.values()), "windows": len(matched)}, rows


def bandwidth_gb_s(elements: int, repeats: int = 10) -> float:
    """fp32 a + b -> c over ``elements``: bytes moved (two reads, one write) per second."""
    a, b, c = torch.randn(elements), torch.randn(elements), torch.empty(elements)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.add(a, b, out=c)
        best = min(best, time.perf_counter() - start)
    return 3 * 4 * elements / best / 1e9


def measure(config_path: str, precision: str, mode: str, compiled: bool, windows: int, profiled: int) -> dict:
    overrides = [f"train.precision={precision}", f"model.dropout_mode={mode}", "train.device=cpu",
                 f"train.compile={str(compiled).lower()}"]  # fmt: skip
    config = load_config(ROOT / config_path, overrides)
    warmup = 3
    work = workload(config, windows + profiled + 1, warmup)
    timed, rest = work.batches[: warmup + windows], work.batches[warmup + windows :]
    state = [work.model.init_state(config.data.batch_size)]

    def train_window(inputs, targets):
        state[0] = work.step(inputs, targets, state[0]).state

    naive, optimizer = work.naive()
    naive_state = [naive.init_state(config.data.batch_size)]

    def naive_window(inputs, targets):
        naive_state[0] = naive_step(naive, optimizer, config, inputs, targets, naive_state[0])

    tokens = timed[0][1].numel()
    rates = {}
    for name, run_window in (("tiedlm", train_window), ("naive", naive_window)):
        rates[name] = time_windows(run_window, timed, warmup, work.device).tokens_per_s
    breakdown, operators = {}, {}
    for name, run_window in (("tiedlm", train_window), ("naive", naive_window)):
        shaped = profile_windows(run_window, rest[:1], shapes=True)[0]
        windows = profile_windows(run_window, rest[1:], shapes=False)
        breakdown[name], operators[name] = categorise(windows, shaped, work.vocab_size)
    flops = training_flops_per_token(config, work.vocab_size, work.unique_fraction)
    peak = matmul_peak_gflops(torch.bfloat16 if precision == "bf16" else torch.float32, work.device)
    return {
        "config": config.name,
        "precision": precision,
        "dropout_mode": mode,
        "compile": compiled,
        "tokens_per_window": tokens,
        "vocab_size": work.vocab_size,
        "cpu_features": cpu_features().describe(),
        "unique_target_fraction": work.unique_fraction,
        "train_tokens_per_s": rates["tiedlm"],
        "reference_train_tokens_per_s": rates["naive"],
        "gflop_per_window": flops * tokens / 1e9,
        "matmul_peak_gflops": peak,
        "bandwidth_gb_s": bandwidth_gb_s(tokens * work.vocab_size),
        "breakdown_ms": breakdown,
        "operators": {name: rows[:12] for name, rows in operators.items()},
    }


def bounds(row: dict) -> dict:
    """Tokens/s that the window could reach if parts of it took no time (from the profiled shares)."""
    mine = row["breakdown_ms"]["tiedlm"]
    window = row["tokens_per_window"] / row["train_tokens_per_s"] * 1000  # unprofiled ms per window
    scale = window / mine["profiled window ms"]  # the profiler's overhead, spread evenly
    products = mine[MATMULS] * scale
    vocab = mine[VOCAB] * scale
    logits_pass_ms = 3 * 4 * row["tokens_per_window"] * row["vocab_size"] / row["bandwidth_gb_s"] / 1e6
    return {
        "window_ms": window,
        "products_ms": products,
        "products_at_peak_ms": row["gflop_per_window"] / row["matmul_peak_gflops"] * 1000,
        "vocab_ms": vocab,
        "vocab_passes": vocab / logits_pass_ms,
        "logits_pass_ms": logits_pass_ms,
        "only_products_tok_s": row["tokens_per_window"] / products * 1000,
        "no_vocab_tok_s": row["tokens_per_window"] / (window - vocab) * 1000,
    }


def render(result: dict, json_name: str = "profile.json") -> str:
    lines = header(result, "Where a training step's time goes (torch.profiler)", json_name, result["threads"])
    lines += [
        f"{result['windows']} timed windows (median, no profiler) and {result['profiled']} profiled windows",
        "(batch 20 × 35) per case, after 3 warm-up windows. Each operator's own CPU time is",
        'sorted into a category; "(tokens x |V|) element-wise" is every non-product operator',
        "with an input whose last dimension is |V| (the logits, the τ-softmaxes, the KL and",
        "their gradients; with `train.compile = true`, the compiled kernels that fuse them and",
        'the CE); "between operators" is time inside the window not spent in any',
        "operator. A profiled window (the sum of these) is slower than an unprofiled one by the",
        "profiler's own cost; the bounds below scale the shares to the unprofiled window. The",
        "naive reference is `tiedlm.bench.naive_step` on the same batches (one more window, traced",
        "with shapes, says which operators are (tokens x |V|)).",
        "",
    ]
    for row in result["rows"]:
        b = bounds(row)
        mine, naive = row["breakdown_ms"]["tiedlm"], row["breakdown_ms"]["naive"]
        lines += [
            f"## {row['config']}, {row['precision']}, VD {row['dropout_mode']}"
            + (", `train.compile = true`" if row.get("compile") else ""),
            "",
            f"Training {row['train_tokens_per_s']:,.0f} tok/s (naive reference "
            f"{row['reference_train_tokens_per_s']:,.0f}, ratio "
            f"{row['train_tokens_per_s'] / row['reference_train_tokens_per_s']:.2f}x): {b['window_ms']:.1f} ms per "
            f"window of {row['tokens_per_window']} tokens. Unique targets per window: "
            f"{row['unique_target_fraction']:.0%} of the tokens. CPU features: `{row.get('cpu_features', '?')}`.",
            "",
            "| category | tiedlm ms/window (profiled) | share | naive ms/window (profiled) | share |",
            "|---|---:|---:|---:|---:|",
        ]
        for category in CATEGORIES:
            lines.append(
                f"| {category} | {mine[category]:.1f} | {mine[category] / mine['profiled window ms']:.0%} "
                f"| {naive[category]:.1f} | {naive[category] / naive['profiled window ms']:.0%} |"
            )
        lines += [
            f"| whole window | {mine['profiled window ms']:.1f} | | {naive['profiled window ms']:.1f} | |",
            "",
            f"- Matrix products: {row['gflop_per_window']:.1f} GFLOP per window take {b['products_ms']:.1f} ms "
            f"(the profiled share of the unprofiled window); at this machine's measured {row['precision']} "
            f"peak ({row['matmul_peak_gflops']:.0f} GFLOP/s) they would take {b['products_at_peak_ms']:.1f} ms.",
            f"- (tokens x |V|) element-wise work: {b['vocab_ms']:.1f} ms per window, as long as "
            f"{b['vocab_passes']:.1f} fp32 read-read-write passes over a {row['tokens_per_window']} x "
            f"{row['vocab_size']:,} array at the measured {row['bandwidth_gb_s']:.1f} GB/s "
            f"({b['logits_pass_ms']:.1f} ms each).",
            f"- If everything but the matrix products took no time: {b['only_products_tok_s']:,.0f} tok/s. "
            f"If the (tokens x |V|) element-wise work took no time: {b['no_vocab_tok_s']:,.0f} tok/s.",
            "",
            "Operators by own time (tiedlm, ms per profiled window; V = an input ends in |V|):",
            "",
            "| operator | V | ms |",
            "|---|---|---:|",
        ]
        for op in row["operators"]["tiedlm"]:
            lines.append(f"| `{op['operator']}` | {'V' if op['vocab_wide'] else ''} | {op['ms_per_window']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=15, help="timed windows per case (no profiler)")
    parser.add_argument("--profiled", type=int, default=8, help="profiled windows per case (+1 traced with shapes)")
    parser.add_argument("--case", action="append", metavar="CONFIG:PRECISION:MODE[:compile]",
                        help="profile these cases instead of the default ones (repeatable)")  # fmt: skip
    parser.add_argument(
        "--out",
        default="profile",
        help="write the results as NAME.json and NAME.md (upper case) beside this script",
        metavar="NAME",
    )
    args = parser.parse_args()
    cases = CASES
    if args.case:
        cases = []
        for case in args.case:
            config_path, precision, mode, *compiled = case.split(":")
            cases.append((config_path, precision, mode, compiled == ["compile"]))
    tune_allocator()
    began = time.perf_counter()
    rows = []
    for config_path, precision, mode, compiled in cases:
        row = measure(config_path, precision, mode, compiled, args.windows, args.profiled)
        print(f"{row['config']} {precision} {mode} compile={compiled}: {row['train_tokens_per_s']:,.0f} tok/s")
        rows.append(row)
    result = record("profile_step.py", began, threads=torch.get_num_threads(), windows=args.windows,
                    profiled=args.profiled, rows=rows)  # fmt: skip
    write(result, f"{args.out}.json", f"{args.out.upper()}.md", render(result, f"{args.out}.json"))
    print(f"median unprofiled window: {statistics.median(bounds(r)['window_ms'] for r in rows):.1f} ms")


if __name__ == "__main__":
    main()
