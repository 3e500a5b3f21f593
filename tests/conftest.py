"""Shared fixtures: a tiny synthetic corpus and configs small enough to train in seconds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tiedlm.cli import main

TINY_CONFIG = """
name = "tiny"
seed = 3

[data]
corpus = "{corpus}"
batch_size = 4
bptt = 6
eval_batch_size = 2

[model]
hidden_size = 12
dropout = 0.3
dropout_mode = "{mode}"
tie_weights = {tie}
init_range = 0.1

[loss]
augmented = {augmented}
tau = 5.0
gamma = 0.5

[train]
lr = 1.0
lr_decay = 0.8
lr_decay_start = 2
max_epochs = 2
patience = 3
device = "cpu"
"""


def write_corpus(root: Path, words: int = 1500, vocab: int = 30, seed: int = 0, unk: bool = True) -> Path:
    """A corpus whose text follows a simple pattern, so a model can learn it."""
    rng = random.Random(seed)
    lexicon = [f"w{i}" for i in range(vocab)] + (["<unk>"] if unk else [])

    def text(n: int) -> str:
        lines, line = [], []
        for _ in range(n):
            word = lexicon[(len(line) * 3 + rng.randrange(3)) % len(lexicon)]
            line.append(word)
            if len(line) >= rng.randrange(4, 12):
                lines.append(" ".join(line))
                line = []
        lines.append(" ".join(line))
        return "\n".join(lines) + "\n"

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(text(words) + " ".join(lexicon) + "\n")
    (root / "valid.txt").write_text(text(words // 5))
    (root / "test.txt").write_text(text(words // 5))
    return root


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


def write_config(path: Path, corpus: Path, *, mode: str = "exact", tie: bool = True, augmented: bool = True) -> Path:
    path.write_text(
        TINY_CONFIG.format(corpus=corpus, mode=mode, tie=str(tie).lower(), augmented=str(augmented).lower())
    )
    return path


@pytest.fixture
def config_file(tmp_path: Path, corpus_dir: Path) -> Path:
    return write_config(tmp_path / "tiny.toml", corpus_dir)


@pytest.fixture
def trained_run(tmp_path: Path, config_file: Path) -> Path:
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(run)]) == 0
    return run


# Tests whose outcome depends on the CPU's kernels (bf16, oneDNN, the hand-written recurrences):
# .ci/run runs them a second time with the CPU capped to AVX2 (`pytest -m kernels`).
KERNEL_MODULES = {
    "test_precision.py", "test_model.py", "test_loss.py", "test_train.py", "test_bench.py",
    "test_rhn.py", "test_transformer.py",
}  # fmt: skip
KERNEL_TESTS = {"test_eval_both_splits_and_batch_size_one"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in KERNEL_MODULES or item.originalname in KERNEL_TESTS:
            item.add_marker(pytest.mark.kernels)
