"""One speed measurement in this process: tiedlm's training step (and the naive reference) on the
same batches, interleaved, timed both by the wall clock and by this process's CPU time.

    python benchmarks/interleaved.py CONFIG [--set K=V ...] [--threads N] [--reference] [--eval-tokens N]

Prints one JSON object. Used by benchmarks/avx2.py and benchmarks/wt2_medium.py, which run it in a
child process per case so that the CPU caps (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY,
TIEDLM_CPU_ISA) take effect before torch starts.

Why both clocks: on a machine shared with other processes the wall clock also counts the time the
scheduler gives to them, so it varies from minute to minute; with one thread the process CPU time
counts only this process's work (cache and memory-bandwidth sharing still slow it). Rounds
alternate tiedlm and the reference (``--rounds`` x ``--windows`` windows each, the first window of
the first round is warm-up), so both see the same conditions; the rates are medians over windows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tiedlm.bench import matmul_peak_gflops, naive_step, training_flops_per_token, workload
from tiedlm.config import load_config
from tiedlm.evaluate import evaluate
from tiedlm.precision import cpu_features
from tiedlm.runtime import frozen_heap, tune_allocator

# What an AVX2-only CPU offers, imposed on this one (docs/precision.md).
AVX2_CAPS = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "TIEDLM_CPU_ISA": "avx2",
}


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _peak_by_cpu_time(dtype: torch.dtype, size: int = 2048, repeats: int = 6) -> float:
    """GFLOP of a size² product per second of this process's CPU time (all threads' seconds summed)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    best = float("inf")
    for _ in range(repeats):
        cpu = time.process_time()
        torch.mm(a, b)
        best = min(best, time.process_time() - cpu)
    return 2 * size**3 / best / 1e9


def measure(config_path: str, overrides: list[str], threads: int, windows: int, rounds: int,
            reference: bool, eval_tokens: int) -> dict:  # fmt: skip
    tune_allocator()
    torch.set_num_threads(threads)
    config = load_config(config_path, [*overrides, "train.device=cpu"])
    work = workload(config, windows, 1)
    batches = work.batches[1:]
    state = [work.model.init_state(config.data.batch_size)]
    runners = {"tiedlm": lambda i, t: state.__setitem__(0, work.step(i, t, state[0]).state)}
    if reference:
        naive, optimizer = work.naive()
        naive_state = [naive.init_state(config.data.batch_size)]
        runners["naive"] = lambda i, t: naive_state.__setitem__(
            0, naive_step(naive, optimizer, config, i, t, naive_state[0])
        )
    for run in runners.values():  # warm-up window
        run(*work.batches[0])
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in runners}
    load_before = _load()
    began = time.perf_counter()
    with frozen_heap():  # as the trainer has it
        for _ in range(rounds):
            for name, run in runners.items():
                for inputs, targets in batches:
                    wall, cpu = time.perf_counter(), time.process_time()
                    run(inputs, targets)
                    times[name]["cpu"].append(time.process_time() - cpu)
                    times[name]["wall"].append(time.perf_counter() - wall)
    tokens = batches[0][1].numel()
    result = {
        "config": config.name,
        "overrides": overrides,
        "precision": work.step.precision,
        "threads": torch.get_num_threads(),
        "cpu_features": cpu_features().describe(),
        "caps": {k: os.environ[k] for k in AVX2_CAPS if k in os.environ},  # fmt: skip
        "tokens_per_window": tokens,
        "timed_windows": len(batches) * rounds,
        "vocab_size": work.vocab_size,
        "unique_target_fraction": work.unique_fraction,
        "gflop_per_token": training_flops_per_token(config, work.vocab_size, work.unique_fraction) / 1e9,
        "load_average": [load_before, _load()],
        "timing_s": time.perf_counter() - began,
    }
    for name, clock in times.items():
        for kind, seconds in clock.items():
            result[f"{name}_tok_s_{kind}"] = tokens / statistics.median(seconds)
    if reference:
        for kind in ("wall", "cpu"):
            result[f"ratio_{kind}"] = result[f"tiedlm_tok_s_{kind}"] / result[f"naive_tok_s_{kind}"]
    if eval_tokens:
        ids = work.corpus.valid[: eval_tokens + 1]
        size = config.data.eval_batch_size
        evaluate(work.model, ids[: size * config.data.bptt * 2 + 1], size, config.data.bptt, work.step.precision)
        wall, cpu = time.perf_counter(), time.process_time()
        evaluation = evaluate(work.model, ids, size, config.data.bptt, work.step.precision)
        result["eval_tok_s_cpu"] = evaluation.tokens / (time.process_time() - cpu)
        result["eval_tok_s_wall"] = evaluation.tokens / (time.perf_counter() - wall)
        result["eval_tokens"] = evaluation.tokens
    dtype = torch.bfloat16 if work.step.precision == "bf16" else torch.float32
    result["matmul_peak_gflops_wall"] = matmul_peak_gflops(dtype, work.device)
    result["matmul_peak_gflops_cpu"] = _peak_by_cpu_time(dtype)  # GFLOP per CPU-second
    result["train_tokens"] = work.corpus.train.numel()
    result["valid_tokens"] = work.corpus.valid.numel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--windows", type=int, default=3, help="windows per round and runner")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also time the naive reference, interleaved")
    parser.add_argument("--eval-tokens", type=int, default=0, help="validation tokens to evaluate (0: none)")
    args = parser.parse_args()
    result = measure(args.config, args.overrides, args.threads, args.windows, args.rounds, args.reference,
                     args.eval_tokens)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()


def run_case(config: str, overrides: list[str], *, threads: int, caps: dict[str, str] | None = None,
             source: str | None = None, windows: int = 3, rounds: int = 3, reference: bool = False,
             eval_tokens: int = 0) -> dict:  # fmt: skip
    """:func:`measure` in a child process with the CPU ``caps`` in its environment; ``source`` is a
    ``src`` folder to import tiedlm from instead (a baseline checkout)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in AVX2_CAPS}
    env.update(caps or {})
    env["OMP_NUM_THREADS"] = str(threads)
    if source:
        env["PYTHONPATH"] = source
    config = str((Path(__file__).resolve().parents[1] / config).resolve())  # relative to the repository
    command = [sys.executable, str(Path(__file__).resolve()), config, "--threads", str(threads),
               "--windows", str(windows), "--rounds", str(rounds), "--eval-tokens", str(eval_tokens)]  # fmt: skip
    command += [f"--set={o}" for o in overrides] + (["--reference"] if reference else [])
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["source"] = source or "this checkout"
    return result


def add_options(parser, rounds: int) -> None:
    """The options of every script that runs :func:`run_case`: thread counts, windows per round, rounds,
    and a baseline commit to measure the same cases at."""
    parser.add_argument("--threads", default="1", help="comma-separated thread counts")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--baseline", help="a commit to measure the same cases at, alternating with this one")


def sources(args) -> list[tuple[str | None, str]]:
    """(``src`` folder or None for this checkout, label) to measure, the baseline first."""
    found: list[tuple[str | None, str]] = [(None, "this commit")]
    if args.baseline:
        found.insert(0, (baseline_source(args.baseline), f"baseline {args.baseline}"))
    return found


def baseline_source(ref: str) -> str:
    """A worktree of commit ``ref`` under /tmp (made once), for before/after measurements; its src/."""
    import subprocess
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", ref], cwd=root, capture_output=True, text=True, check=True)
    folder = Path(tempfile.gettempdir()) / f"tiedlm-baseline-{commit.stdout.strip()[:12]}"
    if not folder.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(folder), ref], cwd=root, check=True,
                       capture_output=True)  # fmt: skip
    return str(folder / "src")
