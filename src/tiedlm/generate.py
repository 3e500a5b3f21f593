"""Sampling continuations of a prompt, and scoring text line by line."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tiedlm.data import EOS, Vocabulary
from tiedlm.errors import TiedlmError
from tiedlm.loss import cross_entropy


def encode_words(vocab: Vocabulary, words: list[str], where: str) -> tuple[list[int], list[str]]:
    """Ids of ``words`` and the words that were not in the vocabulary (mapped to ``<unk>``)."""
    unknown = [w for w in words if w not in vocab.stoi]
    if unknown and vocab.unk_id is None:
        raise TiedlmError(f"{where}: word {unknown[0]!r} is not in the vocabulary, which has no <unk>")
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
    sampled together, one batched step per word. Returns (words, unknown prompt words) per prompt."""
    if temperature < 0:
        raise TiedlmError(f"--temperature must be ≥ 0, got {temperature}")
    if top_k < 0:
        raise TiedlmError(f"--top-k must be ≥ 0, got {top_k}")
    if not prompts:
        return []
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    lasts, states, unknowns = [], [], []
    for prompt in prompts:  # prompts differ in length: read each from its own sentence start
        ids, unknown = encode_words(vocab, prompt.split(), "--prompt")
        inputs = torch.tensor([vocab.stoi[EOS], *ids], device=device).unsqueeze(1)  # (T, 1)
        logits, state = model(inputs, model.init_state(1))
        lasts.append(logits[-1].float())
        states.append(state)
        unknowns.append(unknown)
    last = torch.cat(lasts)  # (P, |V|)
    state = tuple(torch.cat(parts, dim=1) for parts in zip(*states, strict=True))
    out = []
    for step in range(words):
        if temperature == 0:
            choice = last.argmax(dim=-1)
        else:
            if top_k:
                threshold = torch.topk(last, min(top_k, last.size(-1)), dim=-1).values[:, -1:]
                last = last.masked_fill(last < threshold, float("-inf"))
            probs = torch.softmax(last / temperature, dim=-1)
            choice = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        out.append(choice)
        if step + 1 < words:
            logits, state = model(choice.unsqueeze(0), state)
            last = logits[-1].float()
    sampled = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]
    return [(vocab.decode(row), unknown) for row, unknown in zip(sampled, unknowns, strict=True)]


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
    model: torch.nn.Module, vocab: Vocabulary, lines: list[str], batch_size: int = 32, where: str = "input"
) -> list[LineScore]:
    """Score each line on its own: P(w_1 … w_n <eos> | <eos>), from a fresh state.

    Lines are batched by length and padded at the end; padding never affects
    earlier positions of a left-to-right model and is excluded from the sums.
    """
    model.eval()
    device = next(model.parameters()).device
    eos = vocab.stoi[EOS]
    encoded = []
    for number, line in enumerate(lines, 1):
        ids, _ = encode_words(vocab, line.split(), f"{where}:{number}")
        encoded.append([eos, *ids, eos])
    scores: list[LineScore | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        group = order[start : start + batch_size]
        longest = max(len(encoded[i]) for i in group)
        batch = torch.full((longest, len(group)), eos, dtype=torch.long)
        mask = torch.zeros(longest - 1, len(group), dtype=torch.bool)
        for column, i in enumerate(group):
            batch[: len(encoded[i]), column] = torch.tensor(encoded[i])
            mask[: len(encoded[i]) - 1, column] = True
        batch, mask = batch.to(device), mask.to(device)
        logits, _ = model(batch[:-1], model.init_state(len(group)))
        nll = cross_entropy(logits.flatten(0, 1), batch[1:].flatten()).view_as(mask) * mask
        for column, i in enumerate(group):
            scores[i] = LineScore(-float(nll[:, column].sum()), int(mask[:, column].sum()))
    return scores
