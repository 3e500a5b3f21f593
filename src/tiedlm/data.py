"""Text → vocabulary ids → batches.

Corpora are read as words separated by whitespace, with one ``<eos>`` appended
to every line (blank lines included), as in Mikolov's PTB setup. The bundled
corpora (``ptb``, ``wikitext-2``) are xz-compressed inside the package and
their SHA-256 is checked every time they are loaded. Any directory holding
``train.txt``, ``valid.txt`` and ``test.txt`` is a custom corpus.

The vocabulary comes from the training split only, most frequent word first
(ties in order of first appearance). Words of valid/test that the training
split lacks map to ``<unk>`` when the vocabulary has it; otherwise loading
fails and names the first such word and its line.
"""

from __future__ import annotations

import hashlib
import lzma
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from tiedlm.errors import TiedlmError

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
BUNDLED = ("ptb", "wikitext-2")


class Vocabulary:
    """A bijection between words and ids 0..len-1."""

    def __init__(self, words: list[str]):
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise TiedlmError("vocabulary: duplicate words")

    @classmethod
    def from_lines(cls, lines: list[list[str]]) -> Vocabulary:
        counts = Counter(w for line in lines for w in line)
        return cls([w for w, _ in counts.most_common()])  # stable: ties keep first-seen order

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    @property
    def unk_id(self) -> int | None:
        return self.stoi.get(UNK)

    def encode(self, words: list[str]) -> list[int]:
        """Ids of ``words``; unknown words become ``<unk>`` (KeyError if there is none)."""
        unk = self.unk_id
        if unk is None:
            return [self.stoi[w] for w in words]
        return [self.stoi.get(w, unk) for w in words]

    def decode(self, ids: list[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def save(self, path: Path) -> None:
        path.write_text("".join(w + "\n" for w in self.itos), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TiedlmError(f"vocabulary {path}: cannot read ({exc})") from None
        words = text.split("\n")[:-1]
        if not words or any(not w or w.split() != [w] for w in words):
            raise TiedlmError(f"vocabulary {path}: expected one word per line")
        return cls(words)


def tokenize(text: str) -> list[list[str]]:
    """Split text into lines of words, each line ending in ``<eos>``.

    A line ends at ``\\n`` (a final line without one still counts); ``\\r`` and
    other whitespace separate words.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.split() + [EOS] for line in lines]


def _decode(data: bytes, name: str) -> str:
    if not data:
        raise TiedlmError(f"{name}: file is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TiedlmError(f"{name}: not valid UTF-8 (line {line}, byte {exc.start})") from None


def _bundled_checksums() -> dict[str, str]:
    text = (resources.files("tiedlm.datasets") / "SHA256SUMS").read_text(encoding="ascii")
    return {name: digest for digest, name in (line.split() for line in text.splitlines() if line)}


def read_bundled(corpus: str, split: str) -> str:
    """Decompress a bundled split and verify its SHA-256 against ``datasets/SHA256SUMS``."""
    return _read_bundled(corpus, split)[0]


def _read_bundled(corpus: str, split: str) -> tuple[str, str]:
    name = f"{corpus}/{split}.txt"
    data = lzma.decompress((resources.files("tiedlm.datasets") / f"{name}.xz").read_bytes())
    expected = _bundled_checksums()[name]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise TiedlmError(f"bundled corpus {name}: SHA-256 {actual[:12]}… does not match {expected[:12]}…")
    return _decode(data, f"bundled corpus {name}"), actual


def _read_split_file(path: Path) -> tuple[str, str]:
    """The text of a split file and the SHA-256 of its bytes."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TiedlmError(f"{path}: no such file (a corpus directory needs train.txt, valid.txt, test.txt)") from None
    except OSError as exc:
        raise TiedlmError(f"{path}: cannot read ({exc.strerror})") from None
    return _decode(data, str(path)), hashlib.sha256(data).hexdigest()


@dataclass
class Corpus:
    """A corpus as 1-D id tensors, one per split, plus the training vocabulary.

    ``files`` names each split's file (for errors) and ``sha256`` holds the SHA-256 of its
    bytes, which a run records so that it can check the corpus it resumes on.
    """

    name: str
    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    files: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise TiedlmError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        return getattr(self, name)

    def describe(self, split: str) -> str:
        """The split and its file, for messages: ``corpus/valid.txt (valid split)``."""
        return f"{self.files.get(split, self.name)} ({split} split)"

    def check_batchable(self, split: str, batch_size: int, option: str) -> None:
        """Refuse, before training starts, a split too short for ``batch_size`` streams (see batchify)."""
        _check_rows(self.split(split).numel(), batch_size, self.describe(split), option)


def _encode_split(lines: list[list[str]], vocab: Vocabulary, where: str) -> torch.Tensor:
    unk = vocab.unk_id
    ids: list[int] = []
    stoi = vocab.stoi
    for number, line in enumerate(lines, 1):
        for word in line:
            index = stoi.get(word, unk)
            if index is None:
                raise TiedlmError(
                    f"{where}:{number}: word {word!r} is not in the training vocabulary, which has no {UNK}"
                )
            ids.append(index)
    return torch.tensor(ids, dtype=torch.long)


def load_corpus(corpus: str, vocab: Vocabulary | None = None) -> Corpus:
    """Load a bundled corpus by name, or a directory with ``train/valid/test.txt``.

    With ``vocab`` given (e.g. a checkpoint's), the corpus must have exactly
    that training vocabulary.
    """
    from tiedlm.fetch import SOURCES, cached_corpus, verify_cached

    if not isinstance(corpus, str) or not corpus or "\0" in corpus:
        raise TiedlmError(f"corpus {corpus!r}: expected a bundled corpus name or a directory")
    if corpus in BUNDLED:
        read = {s: _read_bundled(corpus, s) for s in SPLITS}
        where = {s: f"{corpus}/{s}.txt" for s in SPLITS}
    else:
        root = Path(corpus)
        if corpus in SOURCES and not root.is_dir():  # a fetched corpus, from the data cache
            cached = cached_corpus(corpus)
            if cached is None:
                raise TiedlmError(f"corpus {corpus!r} is not downloaded yet: run tiedlm data fetch {corpus}")
            verify_cached(cached)
            root = cached
        if not root.is_dir():
            known = ", ".join(BUNDLED)
            raise TiedlmError(f"corpus {corpus!r}: not a bundled corpus ({known}) nor a directory")
        read = {s: _read_split_file(root / f"{s}.txt") for s in SPLITS}
        where = {s: str(root / f"{s}.txt") for s in SPLITS}
    lines = {s: tokenize(read[s][0]) for s in SPLITS}
    for split in SPLITS:  # blank lines alone are only <eos>: nothing to learn or to measure
        if all(len(line) == 1 for line in lines[split]):
            raise TiedlmError(f"{where[split]}: has no words (the file is empty but for whitespace)")
    train_vocab = Vocabulary.from_lines(lines["train"])
    if vocab is not None and vocab != train_vocab:
        raise TiedlmError(
            f"corpus {corpus!r}: its training vocabulary ({len(train_vocab)} words) does not match "
            f"the checkpoint's ({len(vocab)} words)"
        )
    ids = {s: _encode_split(lines[s], train_vocab, where[s]) for s in SPLITS}
    sha256 = {f"{s}.txt": read[s][1] for s in SPLITS}
    return Corpus(corpus, train_vocab, ids["train"], ids["valid"], ids["test"], where, sha256)


# Batching for truncated BPTT.
#
# batchify cuts the token stream into `batch_size` contiguous columns; column b
# is sequence b, read top to bottom, and the tail that does not fill a row is
# dropped. With the stream "a b c ... x" and batch_size 4:
#
#        b=0 b=1 b=2 b=3
#   t=0 [ a   g   m   s ]      bptt_windows then slides down the rows, bptt at
#   t=1 [ b   h   n   t ]      a time: inputs = rows i..i+bptt-1, targets =
#   t=2 [ c   i   o   u ]      rows i+1..i+bptt (the next word, same column).
#   t=3 [ d   j   p   v ]
#   t=4 [ e   k   q   w ]      window 1 (bptt=3): inputs t=0..2, targets t=1..3
#   t=5 [ f   l   r   x ]      window 2:          inputs t=3..4, targets t=4..5
#
# The LSTM state at the end of a window is the start state of the next one
# (column b continues sequence b), but it is detached, so gradients flow back
# at most bptt steps.


def batchify(
    ids: torch.Tensor, batch_size: int, where: str = "token stream", option: str = "batch size"
) -> torch.Tensor:
    """(N,) token ids → (N // batch_size, batch_size), one contiguous sequence per column.

    ``where`` (the split and its file) and ``option`` (the setting that gave ``batch_size``)
    name the culprits when the stream is too short for two rows.
    """
    _check_rows(ids.numel(), batch_size, where, option)
    rows = ids.numel() // batch_size
    return ids[: rows * batch_size].view(batch_size, rows).t().contiguous()  # (T, B)


def _check_rows(tokens: int, batch_size: int, where: str, option: str) -> None:
    if tokens // batch_size < 2:  # one row is an input without a target
        raise TiedlmError(
            f"{where}: {tokens} tokens are too few for {option} = {batch_size} (at least {2 * batch_size} needed)"
        )


def bptt_windows(source: torch.Tensor, bptt: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs, targets), each (≤bptt, B), from window number ``start`` on."""
    for i in range(start * bptt, source.size(0) - 1, bptt):
        length = min(bptt, source.size(0) - 1 - i)
        yield source[i : i + length], source[i + 1 : i + 1 + length]


def num_windows(source: torch.Tensor, bptt: int) -> int:
    return (source.size(0) - 1 + bptt - 1) // bptt


def detach_state(state):
    """Cut the graph at a window boundary, keeping the values."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)
