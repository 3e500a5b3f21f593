"""Memory and speed at |V| = 267,735 (WikiText-103's vocabulary), with and without the augmented loss.

    python benchmarks/large_vocab.py            # both cases, each in its own process (~3 min on 2 cores)

A synthetic corpus of Zipf-distributed word ids (exponent 1, like natural text)
over 267,735 words trains a tied 2-layer LSTM (RE, then REAL) for a few BPTT
windows of batch 20 × 35. Each case runs in a fresh process so that its peak
resident memory is its own. Reported: median training tokens/s over the timed
windows, peak RSS, and the sizes that peak is made of — the (tokens × |V|) logits
and their gradient are the model's own (any softmax output layer needs them); the
augmented loss adds at most one (≤ max_chunk_elements) block at a time, never a
(tokens × |V|) copy per quantity, nor anything of size |V|².

Results: benchmarks/large_vocab.json and benchmarks/LARGE_VOCAB.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from record import header, record, write

from tiedlm.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
from tiedlm.loss import DEFAULT_CHUNK_ELEMENTS
from tiedlm.models import build_model
from tiedlm.runtime import tune_allocator
from tiedlm.training import TrainingStep

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 267_735


def zipf_ids(count: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def run_case(augmented: bool, hidden: int, windows: int, warmup: int, precision: str) -> dict:
    tune_allocator()
    torch.manual_seed(1)
    config = Config(
        data=DataConfig(batch_size=20, bptt=35),
        model=ModelConfig(hidden_size=hidden, num_layers=2, dropout=0.3, tie_weights=True, init_range=0.1),
        loss=LossConfig(augmented=augmented, tau=20.0, gamma=1.0, detach_target=False),
        train=TrainConfig(lr=1.0, precision=precision, device="cpu"),
    )
    model = build_model(config.model, VOCAB).train()
    model.mask_generator = torch.Generator().manual_seed(1)
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=1.0), config)
    batch, bptt = config.data.batch_size, config.data.bptt
    ids = zipf_ids((warmup + windows) * bptt * batch + batch, VOCAB, seed=2)
    source = ids[: (ids.numel() // batch) * batch].view(batch, -1).t().contiguous()
    state = model.init_state(batch)
    seconds, unique = [], []
    for index in range(warmup + windows):
        inputs = source[index * bptt : (index + 1) * bptt]
        targets = source[index * bptt + 1 : (index + 1) * bptt + 1]
        unique.append(targets.unique().numel())
        start = time.perf_counter()
        state = step(inputs, targets, state).state
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    tokens = batch * bptt
    return {
        "augmented": augmented,
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "precision": precision,
        "tokens_per_window": tokens,
        "unique_targets_per_window": statistics.mean(unique),
        "timed_windows": windows,
        "train_tokens_per_s": tokens / statistics.median(seconds),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in model.parameters()),
        "logits_mb": tokens * VOCAB * 4 / 2**20,
        "al_chunk_mb": DEFAULT_CHUNK_ELEMENTS * 4 / 2**20,
        "threads": torch.get_num_threads(),
    }


def render(result: dict) -> str:
    lines = header(result, "Large vocabularies: |V| = 267,735", "large_vocab.json", result["cases"][0]["threads"])
    lines += [
        "A tied 2-layer LSTM on synthetic Zipf-distributed word ids, batch 20 × 35 = 700 tokens per window,",
        f"{result['cases'][0]['timed_windows']} timed windows after warm-up (median), each case in its own process.",
        "",
        "| loss | hidden | precision | train tok/s | peak RSS MB | parameters | logits (700 × |V|) MB "
        "| AL block MB | unique targets / window |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in result["cases"]:
        loss = "RE + AL (REAL)" if case["augmented"] else "RE (cross-entropy)"
        lines.append(
            f"| {loss} | {case['hidden_size']} | {case['precision']} | {case['train_tokens_per_s']:,.0f} "
            f"| {case['peak_rss_mb']:,.0f} | {case['parameters'] / 1e6:.1f}M | {case['logits_mb']:,.0f} "
            f"| {case['al_chunk_mb']:.0f} | {case['unique_targets_per_window']:.0f} |"
        )
    re_case, real_case = result["cases"][0], result["cases"][1]
    extra = real_case["peak_rss_mb"] - re_case["peak_rss_mb"]
    lines += [
        "",
        f"The augmented loss adds {extra:,.0f} MB to the peak, against {re_case['logits_mb']:,.0f} MB for one",
        "copy of the logits. It computes ỹ once per unique target and handles (tokens × |V|) in blocks of at",
        f"most {real_case['al_chunk_mb']:.0f} MB in both passes. The logits and their gradient belong to the",
        "softmax output layer itself, so any LM of this vocabulary holds them.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["re", "real"], help="run one case in this process (internal)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case == "real", args.hidden, args.windows, args.warmup, args.precision)))
        return
    began = time.perf_counter()
    cases = []
    for case in ("re", "real"):
        command = [sys.executable, __file__, "--case", case, "--hidden", str(args.hidden), "--windows",
                   str(args.windows), "--warmup", str(args.warmup), "--precision", args.precision]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        cases.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(cases[-1]), flush=True)
    result = record("large_vocab.py", began, cases=cases)
    write(result, "large_vocab.json", "LARGE_VOCAB.md", render(result))


if __name__ == "__main__":
    main()
