"""Sampling continuations of a prompt, and scoring text line by line.

Both check their arguments with :mod:`tiedlm.validate` first, so the Python API
and the command line refuse the same values with the same message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tiedlm import validate
from tiedlm.data import EOS, Vocabulary
from tiedlm.errors import InvalidArgument, TiedlmError
from tiedlm.loss import cross_entropy

# tiedlm score holds at most this many logits (tokens × |V|) at once: a long line is scored in
# windows of consecutive tokens, carrying the recurrent state, so memory does not grow with it.
SCORE_BLOCK_ELEMENTS = 1 << 24  # 64 MiB of fp32 logits, as the augmented loss's blocks


def encode_words(vocab: Vocabulary, words: list[str], where: str) -> tuple[list[int], list[str]]:
    """Ids of ``words`` and the words that were not in the vocabulary (mapped to ``<unk>``)."""
    unknown = [w for w in words if w not in vocab.stoi]
    if unknown and vocab.unk_id is None:
        raise InvalidArgument(where, f"word {validate.shown(unknown[0])} is not in the vocabulary, which has no <unk>")
    return vocab.encode(words), unknown


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    vocab: Vocabulary,
    prompt: str,
    words: int = 50,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> tuple[list[str], list[str]]:
    """Sample ``words`` words after ``prompt``; returns (generated words, prompt words not in the vocabulary).

    The model starts from a sentence boundary (``<eos>``), reads the prompt, then
    samples from softmax(logits / temperature), restricted to the ``top_k`` most
    likely words when top_k > 0; temperature 0 picks the most likely word.
    """
    [(out, unknown)] = generate_batch(model, vocab, [prompt], words, temperature, top_k, seed)
    return out, unknown


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    vocab: Vocabulary,
    prompts: list[str],
    words: int = 50,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> list[tuple[list[str], list[str]]]:
    """:func:`generate` for several prompts at once: each prompt is read on its own, then all are
    sampled together, one batched step per word. Returns (words, unknown prompt words) per prompt.

    Raises :class:`~tiedlm.errors.InvalidArgument` naming the argument (see
    :func:`tiedlm.validate.generation`).
    """
    prompts = validate.strings(prompts, "prompt")
    words, temperature, top_k, seed = validate.generation(words, temperature, top_k, seed)
    if not prompts:
        return []
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    lasts, states, unknowns = [], [], []
    for number, prompt in enumerate(prompts):  # prompts differ in length: read each from its own sentence start
        ids, unknown = encode_words(vocab, prompt.split(), "prompt" if len(prompts) == 1 else f"prompt[{number}]")
        inputs = torch.tensor([vocab.stoi[EOS], *ids], device=device).unsqueeze(1)  # (T, 1)
        logits, state = model(inputs, model.init_state(1))
        lasts.append(logits[-1].float())
        states.append(state)
        unknowns.append(unknown)
    last = torch.cat(lasts)  # (P, |V|)
    state = tuple(torch.cat(parts, dim=1) for parts in zip(*states, strict=True))
    out = []
    for step in range(words):
        choice = _sample(last, temperature, top_k, generator)
        out.append(choice)
        if step + 1 < words:
            logits, state = model(choice.unsqueeze(0), state)
            last = logits[-1].float()
    sampled = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]
    return [(vocab.decode(row), unknown) for row, unknown in zip(sampled, unknowns, strict=True)]


def _sample(last: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """One word per row of ``last`` (P, |V|): from softmax(logits / temperature), among the top_k.

    Computed as softmax((z − max z) / T) in float64: the shifted logits are ≤ 0, so a tiny T
    sends all but the largest to −inf (greedy) and a huge T all to 0 (uniform over the top_k),
    where z / T itself would overflow to inf − inf = NaN.
    """
    if temperature == 0:
        return last.argmax(dim=-1)
    logits = last.double()
    if top_k and top_k < logits.size(-1):
        threshold = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / temperature, dim=-1)
    if not torch.isfinite(probs).all():
        raise TiedlmError("generate: the model's logits are not finite (a diverged checkpoint?)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def format_words(words: list[str]) -> str:
    """Join words with spaces, starting a new line at each ``<eos>``."""
    return " ".join(words).replace(f" {EOS} ", "\n").replace(EOS, "\n").strip(" ")


@dataclass
class LineScore:
    logprob: float  # natural log-probability of the line's words and its <eos>
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / self.tokens)


@torch.no_grad()
def score_lines(
    model: torch.nn.Module,
    vocab: Vocabulary,
    lines: list[str],
    batch_size: int = 32,
    where: str = "texts",
    max_elements: int = SCORE_BLOCK_ELEMENTS,
) -> list[LineScore]:
    """Score each line on its own: P(w_1 … w_n <eos> | <eos>), from a fresh state.

    Lines are batched by length and padded at the end; padding never affects
    earlier positions of a left-to-right model and is excluded from the sums.
    A batch runs through the model in windows of consecutive tokens, carrying the
    state, with at most ``max_elements`` logits (tokens × |V|) per window, so memory
    does not depend on line length. For the recurrent models this is the same
    computation as one pass (to rounding); a Transformer attends to its
    ``context_size`` previous tokens across a window boundary, as in ``tiedlm eval``.
    ``where`` names the lines in errors (a file name; ``texts`` in the API).
    """
    lines = validate.strings(lines, where, allow_empty=False)
    batch_size = validate.integer(batch_size, "batch_size", low=1)
    max_elements = validate.integer(max_elements, "max_elements", low=1)
    model.eval()
    device = next(model.parameters()).device
    eos = vocab.stoi[EOS]
    encoded = []
    for number, line in enumerate(lines, 1):
        ids, _ = encode_words(vocab, line.split(), f"{where}:{number}")
        encoded.append([eos, *ids, eos])
    # Window length depends on |V| only, not on the batch, so a line scores the same in any batch.
    window = max(1, max_elements // len(vocab))
    scores: list[LineScore | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    start = 0
    while start < len(order):
        steps = min(window, len(encoded[order[min(start + batch_size, len(order)) - 1]]) - 1)
        columns = max(1, min(batch_size, max_elements // (steps * len(vocab))))
        group = order[start : start + columns]
        results = _score_batch(model, [encoded[i] for i in group], window, device)
        for i, (logprob, tokens) in zip(group, results, strict=True):
            scores[i] = LineScore(logprob, tokens)
        start += columns
    return scores


def _score_batch(model: torch.nn.Module, rows: list[list[int]], window: int, device) -> list[tuple[float, int]]:
    """(log-probability, predicted tokens) of each id row (``<eos>`` w_1 … w_n ``<eos>``), in windows."""
    longest = max(len(row) for row in rows)
    eos = rows[0][0]
    batch = torch.full((longest, len(rows)), eos, dtype=torch.long)  # (T, B)
    mask = torch.zeros(longest - 1, len(rows), dtype=torch.bool)
    for column, row in enumerate(rows):
        batch[: len(row), column] = torch.tensor(row)
        mask[: len(row) - 1, column] = True
    batch, mask = batch.to(device), mask.to(device)
    state = model.init_state(len(rows))
    totals = [0.0] * len(rows)
    for t0 in range(0, longest - 1, window):
        t1 = min(t0 + window, longest - 1)
        logits, state = model(batch[t0:t1], state)  # (W, B, |V|)
        nll = cross_entropy(logits.flatten(0, 1), batch[t0 + 1 : t1 + 1].flatten()).view(t1 - t0, len(rows))
        sums = (nll * mask[t0:t1]).sum(dim=0).tolist()
        totals = [total + part for total, part in zip(totals, sums, strict=True)]
    counts = mask.sum(dim=0).tolist()
    return [(-total, int(count)) for total, count in zip(totals, counts, strict=True)]
