"""The prediction study (docs/method.md §8): what two models predict, one context at a time
(:func:`top_predictions`) and over a whole split (:func:`prediction_study`: the mass on ``<unk>``
and on the most frequent words, and how close the top predictions are to the target in
embedding space); :func:`compare_predictions` runs both for two checkpoints and writes the report.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from tiedlm.data import EOS, Vocabulary, bptt_windows
from tiedlm.errors import TiedlmError
from tiedlm.generate import encode_words


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
        f"Generated by `{record['command']}` (commit `{(record.get('commit') or '?')[:8]}`, {record['hardware']}"
        + (f" ({record['cpu_features']})" if record.get("cpu_features") else "")
        + f", {record['wall_s']:.0f} s; do not edit by hand).",
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


def load_pair(path_a: str, path_b: str, device) -> list:
    """The two checkpoints a comparison reads; they must share a vocabulary."""
    from tiedlm.checkpoint import load_checkpoint

    models = [load_checkpoint(path, device) for path in (path_a, path_b)]
    if models[0].vocab != models[1].vocab:
        raise TiedlmError(f"{path_b}: its vocabulary differs from that of {path_a}")
    return models


def context_predictions(models: list, context: str, k: int) -> tuple[list[list[tuple[str, float]]], list[str]]:
    """Each model's top ``k`` next words after ``context``, and the context's words not in the vocabulary."""
    tops, unknown = [], []
    for checkpoint in models:
        top, unknown = top_predictions(checkpoint.model, checkpoint.vocab, context, k)
        tops.append(top)
    return tops, unknown


def compare_predictions(
    models: list,
    paths: tuple[str, str],
    contexts: list,
    report,
    *,
    split: str,
    examples: int,
    seed: int,
    command: str,
    began: float,
) -> dict[tuple[int, int], PredictionStats]:
    """Measure both models over a whole split (each against both embeddings) and write the markdown
    ``report``; ``contexts`` are (context, tops) from :func:`context_predictions`, ``began`` when the
    study started (perf_counter), for its wall time."""
    from pathlib import Path

    from tiedlm.checkpoint import write_text_atomic
    from tiedlm.data import load_corpus
    from tiedlm.runtime import provenance

    vocab = models[0].vocab
    corpus = load_corpus(models[0].config.data.corpus, vocab=vocab)
    ids = corpus.split(split)
    rng = random.Random(seed)
    positions = sorted(rng.sample(range(10, ids.numel()), min(examples, ids.numel() - 10)))
    bptt = models[0].config.data.bptt
    stats = {}
    for m, checkpoint in enumerate(models):
        for r, reference in enumerate(models):
            stats[(m, r)] = prediction_study(checkpoint.model, vocab, ids, reference.model.embedding.weight,
                                             bptt=bptt, example_positions=positions)  # fmt: skip
    shown = []
    for example_a, example_b in zip(stats[(0, 0)].examples, stats[(1, 1)].examples, strict=True):
        position = example_a["position"]
        shown.append(
            {
                "context": " ".join(vocab.decode(ids[position - 10 : position].tolist())),
                "target": example_a["target"],
                "a": example_a,
                "b": example_b,
            }
        )
    origin = provenance(next(models[0].model.parameters()).device, command)
    record = {
        "command": origin["command"],
        "split": split,
        "seed": seed,
        "hardware": origin["hardware"],
        "cpu_features": origin.get("cpu_features"),
        "commit": origin["commit"],
        "wall_s": time.perf_counter() - began,
    }
    names = tuple(
        describe_checkpoint(path, checkpoint.config, checkpoint.trainer_state)
        for path, checkpoint in zip(paths, models, strict=True)
    )
    text = predictions_markdown(names, stats, contexts, shown, record)
    Path(report).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(report), text)
    return stats
