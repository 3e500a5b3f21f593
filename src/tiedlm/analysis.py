"""The paper's analyses (docs/method.md §8): subspace distance, prediction study, embedding neighbours.

- :func:`subspace_distance` — how far the output matrix W lies from the column
  space of the embedding L: ‖(I − P_L) W‖_F / ‖W‖_F (0 = same space, 1 = orthogonal).
- :func:`run_subspace` — the experiment behind it: untied 2-layer LSTMs without
  dropout, embedding rows kept at unit norm, trained on a random 20,000-word slice
  of PTB with J = β·τ²|V|·J_aug + (1 − β)·J, swept over β and τ, several seeds.
- :func:`top_predictions`, :func:`prediction_study` — what two models predict,
  one context at a time and over a whole split (mass on ``<unk>`` and on the most
  frequent words, and how close the top predictions are to the target in
  embedding space).
- :func:`nearest_words` — cosine neighbours in a model's (tied) embedding.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tiedlm.config import ModelConfig
from tiedlm.data import EOS, Vocabulary, batchify, bptt_windows, detach_state
from tiedlm.errors import TiedlmError
from tiedlm.generate import encode_words
from tiedlm.loss import augmented_kl, cross_entropy
from tiedlm.models import build_model

# --- subspace distance ----------------------------------------------------------------------------------------


def subspace_distance(weight: torch.Tensor, embedding: torch.Tensor) -> float:
    """‖(I − P_L) W‖_F / ‖W‖_F for W, L of shape (|V|, d): W's columns projected on L's column space.

    Exact linear algebra in float64: P_L = U_r U_rᵀ from the SVD of L, r its numerical rank.
    """
    if weight.dim() != 2 or embedding.dim() != 2 or weight.size(0) != embedding.size(0):
        raise ValueError(f"expected W and L with the same number of rows, got {tuple(weight.shape)}, "
                         f"{tuple(embedding.shape)}")  # fmt: skip
    w = weight.detach().to(torch.float64)
    norm = torch.linalg.matrix_norm(w)
    if norm == 0:
        raise ValueError("W is zero: its distance to a subspace is undefined")
    u, s, _ = torch.linalg.svd(embedding.detach().to(torch.float64), full_matrices=False)
    tolerance = s.max() * max(embedding.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    basis = u[:, s > tolerance]
    residual = w - basis @ (basis.T @ w)
    return float(torch.linalg.matrix_norm(residual) / norm)


@dataclass
class SubspaceSettings:
    """The defaults finish within an hour on a 2-core CPU (two runs at a time, one thread each)."""

    betas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    beta_sweep_tau: float = 10.0
    taus: list[float] = field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 20.0])
    tau_sweep_beta: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    words: int = 20_000
    hidden_size: int = 300
    num_layers: int = 2
    epochs: int = 10
    batch_size: int = 20
    bptt: int = 35
    optimizer: str = "sgd"  # "sgd" or "adam" (Adam's per-coordinate steps leave L's span by themselves)
    lr: float = 1.0
    clip: float = 5.0
    init_range: float = 0.1
    decoder_init_range: float = 0.0  # W starts at 0: its distance then measures only what the loss taught it
    detach_target: bool = True

    def grid(self) -> list[tuple[float, float]]:
        """(β, τ) pairs of both sweeps, the shared point once."""
        pairs = [(beta, self.beta_sweep_tau) for beta in self.betas]
        pairs += [(self.tau_sweep_beta, tau) for tau in self.taus if (self.tau_sweep_beta, tau) not in pairs]
        return pairs


def unit_rows_(matrix: torch.Tensor) -> None:
    with torch.no_grad():
        matrix.div_(matrix.norm(dim=1, keepdim=True).clamp_min(1e-12))


def train_subspace(
    train_ids: torch.Tensor, vocab_size: int, beta: float, tau: float, seed: int, settings: SubspaceSettings
) -> dict[str, Any]:
    """One run of the experiment; returns the distance between W and L after training, and the slice used."""
    if not 0.0 <= beta <= 1.0:
        raise TiedlmError(f"beta must be in [0, 1], got {beta}")
    if tau <= 0:
        raise TiedlmError(f"tau must be > 0, got {tau}")
    if train_ids.numel() < settings.words + 1:
        raise TiedlmError(f"the training split has {train_ids.numel()} tokens, fewer than --words {settings.words}")
    torch.manual_seed(seed)
    start = random.Random(seed).randrange(0, train_ids.numel() - settings.words + 1)  # the same slice for all arms
    data = batchify(train_ids[start : start + settings.words], settings.batch_size)
    config = ModelConfig(
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        dropout=0.0,
        tie_weights=False,
        init_range=settings.init_range,
    )
    model = build_model(config, vocab_size)
    embedding, decoder = model.embedding.weight, model.decoder.weight
    torch.nn.init.uniform_(decoder, -settings.decoder_init_range, settings.decoder_init_range)
    unit_rows_(embedding)
    if settings.optimizer not in ("adam", "sgd"):
        raise TiedlmError(f"optimizer must be adam or sgd, got {settings.optimizer!r}")
    optim_class = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.SGD
    optimizer = optim_class(model.parameters(), lr=settings.lr)
    scale = tau * tau * vocab_size  # makes β·τ²|V|·J_aug ≈ β/2·‖W h − L u‖² at large τ (paper §4)
    began = time.perf_counter()
    model.train()
    curve = []
    for _ in range(settings.epochs):
        state = model.init_state(settings.batch_size)
        for inputs, targets in bptt_windows(data, settings.bptt):
            state = detach_state(state)
            logits, state = model(inputs, state, include_bias=False)
            logits, flat = logits.reshape(-1, vocab_size), targets.reshape(-1)
            loss = logits.new_zeros(())
            if beta < 1:
                loss = loss + (1 - beta) * cross_entropy(logits, flat, model.output_bias).mean()
            if beta > 0:
                kl = augmented_kl(logits, flat, embedding, tau, detach_target=settings.detach_target)
                loss = loss + beta * scale * kl.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # averaged over the window's tokens
            if settings.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
            optimizer.step()
            unit_rows_(embedding)
        curve.append(subspace_distance(decoder, embedding))
    return {
        "beta": beta,
        "tau": tau,
        "seed": seed,
        "slice_start": start,
        "distance": curve[-1],
        "curve": curve,
        "final_loss": float(loss.detach()),
        "wall_s": time.perf_counter() - began,
    }


def _subspace_worker(job: tuple[torch.Tensor, int, float, float, int, SubspaceSettings]) -> dict[str, Any]:
    torch.set_num_threads(1)
    return train_subspace(*job)


def run_subspace(
    train_ids: torch.Tensor, vocab_size: int, settings: SubspaceSettings, jobs: int = 1, progress=None
) -> list[dict[str, Any]]:
    """Every (β, τ, seed) run of the grid, ``jobs`` processes at a time (one thread each when jobs > 1)."""
    grid = [(beta, tau, seed) for beta, tau in settings.grid() for seed in settings.seeds]
    work = [(train_ids, vocab_size, beta, tau, seed, settings) for beta, tau, seed in grid]
    if jobs <= 1:
        results = []
        for job in work:
            results.append(train_subspace(*job))
            if progress:
                progress(results[-1], len(results), len(work))
        return results
    import multiprocessing

    results = []
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for result in pool.imap(_subspace_worker, work):
            results.append(result)
            if progress:
                progress(result, len(results), len(work))
    return results


def summarize_subspace(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of the distance per (β, τ)."""
    groups: dict[tuple[float, float], list[float]] = {}
    for run in runs:
        groups.setdefault((run["beta"], run["tau"]), []).append(run["distance"])
    rows = []
    for (beta, tau), values in groups.items():
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        rows.append({"beta": beta, "tau": tau, "distance_mean": mean, "distance_std": std, "runs": len(values)})
    return rows


# --- predictions ----------------------------------------------------------------------------------------------


def _context_state(model, vocab: Vocabulary, words: list[str], where: str) -> tuple[torch.Tensor, list[str]]:
    ids, unknown = encode_words(vocab, words, where)
    device = next(model.parameters()).device
    inputs = torch.tensor([vocab.stoi[EOS], *ids], device=device).unsqueeze(1)
    with torch.no_grad():
        logits, _ = model(inputs, model.init_state(1))
    return torch.log_softmax(logits[-1, 0].float(), dim=-1), unknown


def top_predictions(
    model: torch.nn.Module, vocab: Vocabulary, context: str, k: int = 10
) -> tuple[list[tuple[str, float]], list[str]]:
    """The k most likely next words after ``context`` (read from a sentence start), with probabilities."""
    if k < 1:
        raise TiedlmError(f"-k must be ≥ 1, got {k}")
    model.eval()
    log_probs, unknown = _context_state(model, vocab, context.split(), "--context")
    values, indices = torch.topk(log_probs, min(k, log_probs.numel()))
    return [(vocab.itos[i], math.exp(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)], unknown


@dataclass
class PredictionStats:
    """Averages over every predicted token of a split (batch 1, state carried, as in evaluation)."""

    tokens: int
    perplexity: float
    unk_mass: float  # mean probability given to <unk>
    frequent_mass: float  # mean probability given to the `frequent` most frequent words
    frequent_words: list[str]
    top_cosine: float  # mean over tokens of the prob-weighted cosine(top-k word, target) in the reference embedding
    top_k: int
    target_in_top_k: float  # fraction of tokens whose target is among the top k
    examples: list[dict[str, Any]]


def prediction_study(
    model: torch.nn.Module,
    vocab: Vocabulary,
    ids: torch.Tensor,
    reference: torch.Tensor,
    *,
    bptt: int = 35,
    top_k: int = 5,
    frequent: int = 10,
    example_positions: list[int] | None = None,
    example_k: int = 5,
) -> PredictionStats:
    """Run a model over ``ids`` (batch 1) and measure where its probability mass goes.

    ``reference`` is the (|V|, d) embedding in which closeness to the target is measured
    (use the same one for the models being compared). Vocabulary ids are in training
    frequency order, so the ``frequent`` most frequent words are ids 0..frequent-1.
    """
    model.eval()
    device = next(model.parameters()).device
    unk = vocab.unk_id
    unit = torch.nn.functional.normalize(reference.detach().float().to(device), dim=1)
    positions = set(example_positions or [])
    examples: list[dict[str, Any]] = []
    sums = {"nll": 0.0, "unk": 0.0, "frequent": 0.0, "cosine": 0.0, "hit": 0.0}
    state = model.init_state(1)
    source = ids.to(device).unsqueeze(1)
    offset = 0
    with torch.no_grad():
        for inputs, targets in bptt_windows(source, bptt):
            logits, state = model(inputs, state)
            log_probs = torch.log_softmax(logits[:, 0].float(), dim=-1)  # (T, |V|)
            probs = log_probs.exp()
            target = targets[:, 0]
            sums["nll"] -= float(log_probs.gather(1, target[:, None]).sum())
            if unk is not None:
                sums["unk"] += float(probs[:, unk].sum())
            sums["frequent"] += float(probs[:, :frequent].sum())
            top_p, top_i = probs.topk(top_k, dim=-1)  # (T, k)
            cosine = (unit[top_i] * unit[target][:, None, :]).sum(-1)  # (T, k)
            sums["cosine"] += float(((cosine * top_p).sum(-1) / top_p.sum(-1)).sum())
            sums["hit"] += float((top_i == target[:, None]).any(-1).sum())
            for t in range(inputs.size(0)):
                if offset + t + 1 in positions:  # the position of the predicted token in ids
                    p, i = probs[t].topk(example_k)
                    examples.append(
                        {
                            "position": offset + t + 1,
                            "target": vocab.itos[int(target[t])],
                            "target_prob": float(probs[t, target[t]]),
                            "top": [(vocab.itos[j], float(q)) for q, j in zip(p.tolist(), i.tolist(), strict=True)],
                        }
                    )
            offset += inputs.size(0)
    n = offset
    return PredictionStats(
        tokens=n,
        perplexity=math.exp(sums["nll"] / n),
        unk_mass=sums["unk"] / n,
        frequent_mass=sums["frequent"] / n,
        frequent_words=vocab.itos[:frequent],
        top_cosine=sums["cosine"] / n,
        top_k=top_k,
        target_in_top_k=sums["hit"] / n,
        examples=examples,
    )


# --- neighbours -----------------------------------------------------------------------------------------------


def nearest_words(embedding: torch.Tensor, vocab: Vocabulary, word: str, k: int = 10) -> list[tuple[str, float]]:
    """The k words whose embedding rows have the highest cosine similarity with ``word``'s (itself excluded)."""
    if word not in vocab.stoi:
        raise TiedlmError(f"{word!r} is not in the vocabulary ({len(vocab)} words)")
    if k < 1:
        raise TiedlmError(f"-k must be ≥ 1, got {k}")
    unit = torch.nn.functional.normalize(embedding.detach().float(), dim=1)
    index = vocab.stoi[word]
    similarity = unit @ unit[index]
    similarity[index] = -math.inf
    values, indices = similarity.topk(min(k, len(vocab) - 1))
    return [(vocab.itos[i], v) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


# --- reports --------------------------------------------------------------------------------------------------

PAPER_SUBSPACE = "≈ 1 at β = 0, ≈ 0.06 at β = 1 (τ = 10); already small at τ = 2 (β = 1)"


def plot_subspace(rows: list[dict[str, Any]], settings: SubspaceSettings, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key, fixed, fixed_value, label in (
        (left, "beta", "tau", settings.beta_sweep_tau, "β"),
        (right, "tau", "beta", settings.tau_sweep_beta, "τ"),
    ):
        points = sorted((r for r in rows if r[fixed] == fixed_value), key=lambda r: r[key])
        xs = [r[key] for r in points]
        ax.errorbar(xs, [r["distance_mean"] for r in points], yerr=[r["distance_std"] for r in points],
                    marker="o", capsize=3)  # fmt: skip
        ax.set_xlabel(label)
        other = "τ" if fixed == "tau" else "β"
        ax.set_title(f"{other} = {fixed_value:g}", fontsize=9)
        ax.grid(alpha=0.3)
        if key == "tau":
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
    left.set_ylabel("distance of W from span(L)\n(mean ± std over seeds)")
    left.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def subspace_markdown(rows: list[dict[str, Any]], settings: SubspaceSettings, record: dict[str, Any]) -> str:
    def table(key: str, fixed: str, value: float) -> list[str]:
        points = sorted((r for r in rows if r[fixed] == value), key=lambda r: r[key])
        out = [f"| {key} | distance (mean) | std | runs |", "|---:|---:|---:|---:|"]
        out += [f"| {r[key]:g} | {r['distance_mean']:.3f} | {r['distance_std']:.3f} | {r['runs']} |" for r in points]
        return out

    lines = [
        "# Subspace distance between W and L (docs/method.md §8)",
        "",
        f"Generated by `{record['command']}` (do not edit by hand; numbers in",
        "[`subspace.csv`](subspace.csv), every run with its per-epoch curve in",
        "[`subspace-runs.jsonl`](subspace-runs.jsonl)).",
        "",
        "An untied 2-layer LSTM is trained on a random contiguous slice of PTB train with",
        "J = β·τ²|V|·J_aug + (1 − β)·J; the distance is ‖(I − P_L) W‖_F / ‖W‖_F between the",
        "output matrix W and the column space of the embedding L (0 = W lies in L's space,",
        f"≈ {math.sqrt(1 - settings.hidden_size / 10000):.3f} for unrelated random matrices of this shape).",
        "",
        f"Paper (Inan et al. 2017, §6 figures): {PAPER_SUBSPACE}.",
        "",
        "![subspace distance](subspace.png)",
        "",
        f"## β sweep at τ = {settings.beta_sweep_tau:g}",
        "",
        *table("beta", "tau", settings.beta_sweep_tau),
        "",
        f"## τ sweep at β = {settings.tau_sweep_beta:g}",
        "",
        *table("tau", "beta", settings.tau_sweep_beta),
        "",
        "## Settings",
        "",
        f"- slice: {settings.words:,} contiguous words of PTB train, start drawn from the seed "
        "(the same slice for every (β, τ) of a seed); seeds " + ", ".join(map(str, settings.seeds)),
        f"- model: {settings.num_layers} layers × {settings.hidden_size} units, untied, no dropout, "
        f"uniform ±{settings.init_range:g} init, W (decoder) initialised to ±{settings.decoder_init_range:g}, "
        "embedding rows renormalised to unit norm at the start and after every step",
        f"- training: {settings.epochs} epochs, batch {settings.batch_size}, BPTT {settings.bptt}, "
        f"{settings.optimizer.upper()} lr {settings.lr:g}, gradient-norm clip {settings.clip:g}, loss averaged "
        f"over tokens; AL target ỹ {'detached (a constant)' if settings.detach_target else 'trained (not detached)'}",
        "- choices the paper does not state (optimizer, epochs, initialisation) are ours; with Adam, whose",
        "  per-coordinate steps are not rotation-invariant, W leaves L's space by itself and β = 1 ends far",
        "  higher, and a W started at the same ±0.1 as the other weights needs many more epochs to forget",
        "  its random start",
        "",
        f"Runs: {record['runs']} on {record['hardware']}, {record['jobs']} at a time; wall time "
        f"{record['wall_s'] / 60:.1f} min; commit `{record['commit']}`; torch {record['torch']}.",
        "",
    ]
    return "\n".join(lines)


def write_subspace_results(
    runs: list[dict[str, Any]], settings: SubspaceSettings, out, record: dict[str, Any]
) -> list[dict[str, Any]]:
    """results/subspace.csv, .png, .md and subspace-runs.jsonl."""
    import csv
    import io
    import json
    from pathlib import Path

    from tiedlm.checkpoint import write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize_subspace(runs)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["beta", "tau", "distance_mean", "distance_std", "runs"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "subspace.csv", buffer.getvalue())
    write_text_atomic(out / "subspace-runs.jsonl", "".join(json.dumps(r) + "\n" for r in runs))
    plot_subspace(rows, settings, out / "subspace.png")
    write_text_atomic(out / "subspace.md", subspace_markdown(rows, settings, record))
    return rows


def describe_checkpoint(path: str, config, trainer_state: dict[str, Any]) -> str:
    """One line naming what a checkpoint is: its config, tying, loss and training position."""
    progress = trainer_state.get("progress", {})
    tied = config.model.tie_weights
    decoder = "tied" if tied else "untied"
    if config.model.has_output_bias() == tied:  # not the paper's pairing (a bias only when untied)
        decoder += " with an output bias" if tied else " without an output bias"
    parts = [
        f"`{path}`: config `{config.name}`",
        decoder,
        "augmented loss" if config.loss.augmented else "cross-entropy only",
    ]
    if "epoch" in progress:
        parts.append(f"weights after epoch {progress['epoch']}")
    if progress.get("best_valid_ppl") is not None:
        parts.append(f"best valid perplexity in training {progress['best_valid_ppl']:.2f}")
    return ", ".join(parts)


def prediction_claims(stats: dict[tuple[int, int], PredictionStats]) -> list[str]:
    """The paper's three claims (B = REAL against A = VD), each checked against the measured numbers."""

    def verdict(holds: bool) -> str:
        return "holds" if holds else "does not hold"

    a, b = stats[(0, 0)], stats[(1, 1)]
    in_a = stats[(1, 0)].top_cosine > stats[(0, 0)].top_cosine
    in_b = stats[(1, 1)].top_cosine > stats[(0, 1)].top_cosine
    cosine = {(True, True): "holds in both embeddings", (False, False): "does not hold in either embedding",
              (True, False): "holds in A's embedding only", (False, True): "holds in B's embedding only"}  # fmt: skip
    k = a.top_k
    return [
        f"- B puts less mass on `<unk>` than A: {verdict(b.unk_mass < a.unk_mass)} "
        f"({b.unk_mass:.4f} vs {a.unk_mass:.4f}).",
        f"- B puts less mass on the {len(a.frequent_words)} most frequent words: "
        f"{verdict(b.frequent_mass < a.frequent_mass)} ({b.frequent_mass:.4f} vs {a.frequent_mass:.4f}).",
        f"- B's top {k} words lie nearer the target: {cosine[(in_a, in_b)]} "
        f"(A's embedding {stats[(1, 0)].top_cosine:.4f} vs {stats[(0, 0)].top_cosine:.4f}; "
        f"B's {stats[(1, 1)].top_cosine:.4f} vs {stats[(0, 1)].top_cosine:.4f}).",
    ]


def predictions_markdown(
    names: tuple[str, str],
    stats: dict[tuple[int, int], PredictionStats],
    contexts: list[tuple[str, list[list[tuple[str, float]]]]],
    examples: list[dict[str, Any]],
    record: dict[str, Any],
) -> str:
    """``stats[(model, reference)]``: model 0/1 measured with the embedding of model 0/1.

    ``names`` are one-line descriptions of checkpoints A and B (see ``describe_checkpoint``).
    """
    a, b = names
    first = stats[(0, 0)]
    k = first.top_k
    lines = [
        "# What VD and REAL predict (docs/method.md §8, qualitative study)",
        "",
        f"Generated by `{record['command']}` (do not edit by hand).",
        "",
        f"- A: {a}",
        f"- B: {b}",
        "",
        f"## Over the whole {record['split']} split ({first.tokens:,} predictions, batch 1, state carried)",
        "",
        "| measure | A | B |",
        "|---|---:|---:|",
        f"| perplexity | {stats[(0, 0)].perplexity:.2f} | {stats[(1, 1)].perplexity:.2f} |",
        f"| mean probability on `<unk>` | {stats[(0, 0)].unk_mass:.4f} | {stats[(1, 1)].unk_mass:.4f} |",
        f"| mean probability on the {len(first.frequent_words)} most frequent words | "
        f"{stats[(0, 0)].frequent_mass:.4f} | {stats[(1, 1)].frequent_mass:.4f} |",
        f"| target among the top {k} | {stats[(0, 0)].target_in_top_k:.4f} | {stats[(1, 1)].target_in_top_k:.4f} |",
        f"| cosine(top-{k} words, target), in A's embedding | {stats[(0, 0)].top_cosine:.4f} "
        f"| {stats[(1, 0)].top_cosine:.4f} |",
        f"| cosine(top-{k} words, target), in B's embedding | {stats[(0, 1)].top_cosine:.4f} "
        f"| {stats[(1, 1)].top_cosine:.4f} |",
        "",
        "The most frequent words (training counts): " + ", ".join(f"`{w}`" for w in first.frequent_words) + ".",
        f"The cosine is the mean over predictions of Σ p_i·cos(e_i, e_target) / Σ p_i over the top {k}",
        "words i, with e the embedding named in the row; both models are measured in both embeddings so",
        "that neither is judged only in its own space.",
        "",
        "Paper's claim (Inan et al. 2017, §6): REAL puts less mass on `<unk>` and on very frequent",
        "words and more on words near the target in embedding space. With A as VD and B as REAL,",
        "measured here:",
        "",
        *prediction_claims(stats),
        "",
    ]
    if contexts:
        lines += ["## Chosen contexts (read from a sentence start)", ""]
        for context, (top_a, top_b) in contexts:
            lines += [f"**… {context} ___**", "", "| A | p | B | p |", "|---|---:|---|---:|"]
            for (wa, pa), (wb, pb) in zip(top_a, top_b, strict=True):
                lines.append(f"| {wa} | {pa:.3f} | {wb} | {pb:.3f} |")
            lines.append("")
    if examples:
        lines += [f"## Test-set positions (chosen at random, seed {record['seed']}; state carried)", ""]
        for example in examples:
            lines += [
                f"**… {example['context']} ___** (target `{example['target']}`: "
                f"A {example['a']['target_prob']:.3f}, B {example['b']['target_prob']:.3f})",
                "",
                "| A | p | B | p |",
                "|---|---:|---|---:|",
            ]
            for (wa, pa), (wb, pb) in zip(example["a"]["top"], example["b"]["top"], strict=True):
                lines.append(f"| {wa} | {pa:.3f} | {wb} | {pb:.3f} |")
            lines.append("")
    lines += [f"Measured on {record['hardware']}; commit `{record['commit']}`; {record['wall_s']:.0f} s.", ""]
    return "\n".join(lines)
