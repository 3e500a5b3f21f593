"""The Python API: a trained language model as one object.

    import tiedlm

    lm = tiedlm.LanguageModel.from_pretrained("runs/ptb-small-real")  # a run folder (its best/) or a checkpoint
    lm.score(["the company said it expects higher earnings"])         # log-probabilities and perplexity
    lm.generate(["the company said", "stocks fell"], words=20, temperature=0.8, top_k=50, seed=1)
    lm.save_pretrained("my-model")                                      # a checkpoint folder `tiedlm` reads

A saved folder is the checkpoint folder of the command line: ``config.json``,
``vocab.txt``, ``model.safetensors`` and a SHA-256 ``manifest.json``, written
atomically and verified when loaded. ``save_pretrained`` never replaces anything but
a checkpoint, and that only with ``overwrite=True``.

Every method checks its arguments first, with the same checks as the command line
(:mod:`tiedlm.validate`): a wrong value raises :class:`~tiedlm.errors.InvalidArgument`
(a ``ValueError``), a wrong type :class:`~tiedlm.errors.InvalidArgumentType` (a
``TypeError``), each naming the argument; a problem with a file or a folder raises
:class:`~tiedlm.errors.TiedlmError` naming it. All three are subclasses of ``TiedlmError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tiedlm import validate
from tiedlm.checkpoint import check_save_target, load_checkpoint, save_checkpoint
from tiedlm.config import Config
from tiedlm.data import Vocabulary
from tiedlm.errors import TiedlmError
from tiedlm.generate import LineScore, format_words, generate_batch, score_lines


@dataclass
class Scores:
    """What :meth:`LanguageModel.score` returns: one :class:`LineScore` per text, and the totals."""

    lines: list[LineScore]
    logprob: float  # natural log-probability of all texts together
    tokens: int  # words + one <eos> per text

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / self.tokens)


class LanguageModel:
    """A model with its vocabulary and config; see the module docstring for an example."""

    def __init__(self, model: torch.nn.Module, vocab: Vocabulary, config: Config):
        self.model, self.vocab, self.config = model.eval(), vocab, config

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> LanguageModel:
        """Load a checkpoint folder, or a run folder (its ``best/`` checkpoint); checksums are verified."""
        path, device = validate.path(path), validate.device(device)
        checkpoint = load_checkpoint(path, device)
        return cls(checkpoint.model, checkpoint.vocab, checkpoint.config)

    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a checkpoint folder at ``path``, atomically; missing parent folders are created.

        Nothing but a tiedlm checkpoint is ever replaced: a file, a link or a folder holding
        anything else is refused (:class:`~tiedlm.errors.TiedlmError`), and an existing
        checkpoint only with ``overwrite=True``. An empty folder is written into. A failed
        write (a full disk, an unwritable folder) leaves everything as it was.
        """
        path, overwrite = validate.path(path), validate.flag(overwrite, "overwrite")
        check_save_target(path, overwrite)
        created = [folder for folder in path.parents if not folder.exists()]
        try:
            save_checkpoint(path, self.model, self.config, self.vocab)
        except TiedlmError:
            for folder in created:  # innermost first: the folders this call made, if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise
        return path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> LanguageModel:
        self.model.to(validate.device(device))
        return self

    def score(self, texts: str | list[str], batch_size: int = 32) -> Scores:
        """Score each text on its own, as P(words, ``<eos>`` | ``<eos>``) from a fresh state.

        Words outside the vocabulary count as ``<unk>`` (an error if the vocabulary has none).
        ``texts`` must hold at least one text; memory does not grow with a text's length.
        """
        lines = score_lines(self.model, self.vocab, texts, batch_size, "texts")
        return Scores(lines, sum(s.logprob for s in lines), sum(s.tokens for s in lines))

    def generate(
        self,
        prompt: str | list[str],
        words: int = 50,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> str | list[str]:
        """Continue a prompt (or several, sampled together in one batch) by ``words`` words.

        Returns the prompt followed by its continuation, with a line break at each ``<eos>``;
        a list when given a list. ``words`` ≥ 1; ``temperature`` finite and ≥ 0, where 0 is
        greedy; ``top_k`` an integer ≥ 0 that restricts sampling to the k most likely words
        (0: all); ``seed`` (an integer torch accepts) makes sampling repeatable.
        """
        prompts = validate.strings(prompt, "prompt")
        results = generate_batch(self.model, self.vocab, prompts, words, temperature, top_k, seed)
        texts = [format_words(p.split() + out) for p, (out, _) in zip(prompts, results, strict=True)]
        return texts[0] if isinstance(prompt, str) else texts

    def __repr__(self) -> str:
        parameters = sum(p.numel() for p in self.model.parameters())
        return (
            f"LanguageModel({self.config.model.architecture}, {self.config.model.hidden_size} units, "
            f"|V| = {len(self.vocab)}, {parameters:,} parameters, tied = {self.config.model.tie_weights})"
        )
