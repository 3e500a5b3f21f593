"""How strong is the augmented loss? Its gradient beside the cross-entropy's, on real training windows.

    python scripts/al_strength.py [LABEL=]RUN_OR_CHECKPOINT [...] [--taus 2,5,10,20] [--windows 10] \\
        [--out results/al-strength]

For each model (a trained checkpoint or run folder, or ``init:CONFIG`` for a fresh one of that
config, seeded by ``--seed``; ``LABEL=`` names it on the page) it reads ``--windows`` consecutive
training windows of the config's corpus, with dropout on and the state carried, as training does.
For each τ it takes the gradients over all parameters of

    CE        the mean cross-entropy of the window (J)
    AL(γ=1)   the mean KL(ỹ ‖ ŷ) times τ (α = γτ with γ = 1; the AL's gradient is linear in γ)

and reports the ratio of their norms (the AL's share of the update at γ = 1; multiply by γ), their
cosine, and the same ratio on the word-vector matrix alone. The trainer's loss functions form both
terms (tiedlm/loss/augmented.py), with the config's ``loss.detach_target``.

For an untied model it also gives what the AL is meant to do to the weights (docs/method.md §8):
the distance of the output matrix W from span(L), ‖(I − P_L) W‖_F / ‖W‖_F, and the two matrices'
mean row norms. A tied model's distance is 0 by construction.

Writes OUT.md (do not edit by hand) and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from tiedlm.analysis.subspace import subspace_distance
from tiedlm.checkpoint import load_checkpoint
from tiedlm.config import load_config
from tiedlm.data import batchify, bptt_windows, detach_state, load_corpus
from tiedlm.errors import TiedlmError
from tiedlm.loss import AugmentedLoss
from tiedlm.models import build_model
from tiedlm.runtime import git_commit
from tiedlm.runtime import hardware as runtime_hardware


def load(source: str, seed: int):
    """(label, config, corpus, model) of a checkpoint or run folder, or of ``init:CONFIG`` freshly built."""
    name, _, path = source.rpartition("=")
    described, config, corpus, model = _load(path, seed)
    return (f"{name}: {described}" if name else described), config, corpus, model


def _load(source: str, seed: int):
    if source.startswith("init:"):
        config = load_config(source[len("init:") :])
        corpus = load_corpus(config.data.corpus)
        torch.manual_seed(seed)
        return f"{source} (seed {seed})", config, corpus, build_model(config.model, len(corpus.vocab))
    checkpoint = load_checkpoint(source)
    return (
        str(source),
        checkpoint.config,
        load_corpus(checkpoint.config.data.corpus, checkpoint.vocab),
        checkpoint.model,
    )


def norm(grads) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))


def cosine(a, b) -> float:
    dot = sum(
        float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True) if x is not None and y is not None
    )
    return dot / max(norm(a) * norm(b), 1e-300)


def measure(source: str, taus: list[float], windows: int, seed: int) -> dict:
    label, config, corpus, model = load(source, seed)
    model.train()  # dropout on, as in training
    params = [p for p in model.parameters() if p.requires_grad]
    words = [i for i, p in enumerate(params) if p is model.embedding.weight][0]
    losses = {tau: AugmentedLoss(tau, 1.0, config.loss.detach_target) for tau in taus}
    train = batchify(corpus.split("train"), config.data.batch_size)
    torch.manual_seed(seed)
    state = model.init_state(config.data.batch_size)
    rows = {tau: {"ratio": [], "words_ratio": [], "cosine": [], "kl": [], "ce": []} for tau in taus}
    ce_norms = []
    for n, (inputs, targets) in enumerate(bptt_windows(train, config.data.bptt)):
        if n == windows:
            break
        logits, state = model(inputs, detach_state(state), include_bias=False)
        flat = logits.flatten(0, 1)
        for i, tau in enumerate(taus):
            ce, kl = losses[tau].components(flat, targets.flatten(), model.embedding.weight, model.output_bias)
            if i == 0:
                g_ce = torch.autograd.grad(ce.mean(), params, retain_graph=True, allow_unused=True)
                ce_norms.append(norm(g_ce))
            g_al = torch.autograd.grad(tau * kl.mean(), params, retain_graph=True, allow_unused=True)
            row = rows[tau]
            row["ratio"].append(norm(g_al) / norm(g_ce))
            row["words_ratio"].append(norm([g_al[words]]) / norm([g_ce[words]]))
            row["cosine"].append(cosine(g_al, g_ce))
            row["kl"].append(float(kl.detach().mean()))
            row["ce"].append(float(ce.detach().mean()))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    tied = bool(config.model.tie_weights)
    output, embedding = model.decoder.weight.detach(), model.embedding.weight.detach()
    return {
        "model": label,
        "tied": tied,
        "distance": 0.0 if tied else subspace_distance(output, embedding),
        "row_norms": {"W": float(output.norm(dim=1).mean()), "L": float(embedding.norm(dim=1).mean())},
        "detach_target": bool(config.loss.detach_target),
        "windows": windows,
        "ce_grad_norm": mean(ce_norms),
        "clip": config.train.clip,
        "taus": {str(tau): {key: mean(values) for key, values in row.items()} for tau, row in rows.items()},
    }


def render(results: list[dict], command: str, commit: str, hardware: str, seconds: float) -> str:
    lines = [
        "# How strong is the augmented loss? Its gradient beside the cross-entropy's",
        "",
        f"Generated by `{command}` (commit `{commit}`, {hardware}, {seconds:.0f} s; do not edit by hand;",
        "the numbers are also in the .json beside this page). For each model and temperature τ: the norm of the",
        "gradient of the AL term at γ = 1 (τ·KL(ỹ ‖ ŷ), α = γτ) over the norm of the cross-entropy's, on the",
        "same training windows (dropout on, state carried), all parameters and the word-vector matrix alone,",
        "and the cosine between the two gradients. The AL's gradient is linear in γ: at the configs' γ = 0.5",
        "(PTB) the AL's share is half the ratio shown. KL is the mean per token, in nats.",
        "",
    ]
    for item in results:
        lines += [
            f"## {item['model']}",
            "",
            f"{'tied' if item['tied'] else 'untied'}, detach_target = {str(item['detach_target']).lower()}, "
            f"{item['windows']} windows; cross-entropy gradient norm {item['ce_grad_norm']:.3g} "
            f"(clip {item['clip']:g})",
            "",
            f"distance of W from span(L): {item['distance']:.3f}"
            + (" (tied: W is L)" if item["tied"] else "")
            + f"; mean row norm of W {item['row_norms']['W']:.3g}, of L {item['row_norms']['L']:.3g}",
            "",
            "| τ | KL | ratio, all parameters | ratio, word vectors | cosine |",
            "|---:|---:|---:|---:|---:|",
        ]
        for tau, row in item["taus"].items():
            cells = (f"{float(tau):g}", f"{row['kl']:.3g}", f"{row['ratio']:.3g}", f"{row['words_ratio']:.3g}")
            lines.append(f"| {' | '.join(cells)} | {row['cosine']:+.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="run folders, checkpoints, or init:CONFIG")
    parser.add_argument("--taus", default="2,5,10,20")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="results/al-strength")
    args = parser.parse_args(argv)
    try:
        taus = [float(text) for text in args.taus.split(",")]
    except ValueError:
        sys.exit(f"al_strength: error: --taus {args.taus!r}: expected numbers separated by commas")
    if args.windows < 1 or any(tau <= 0 for tau in taus):
        sys.exit("al_strength: error: --windows must be ≥ 1 and every τ > 0")
    start = time.perf_counter()
    try:
        results = [measure(source, taus, args.windows, args.seed) for source in args.models]
    except TiedlmError as exc:
        sys.exit(f"al_strength: error: {exc}")
    seconds = time.perf_counter() - start
    commit = (git_commit() or "?")[:8]
    bf16 = "AVX-512 BF16" if torch.cpu._is_avx512_bf16_supported() else "AVX2-only"
    hardware = f"{runtime_hardware('cpu')} ({bf16}), torch {torch.__version__}"
    command = "python scripts/al_strength.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "commit": commit, "hardware": hardware, "seconds": seconds}
    out.with_suffix(".json").write_text(json.dumps({**meta, "models": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(results, command, commit, hardware, seconds) + "\n")
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
