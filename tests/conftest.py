"""Shared fixtures: a tiny synthetic corpus and configs small enough to train in seconds."""

from __future__ import annotations

import getpass
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tiedlm.cli import main
from tiedlm.testing import TINY_CONFIG, write_config, write_corpus  # noqa: F401  (tests import them from here)


def _inductor_cache_for_this_isa() -> None:
    """Give torch.compile's on-disk cache one folder per CPU capability.

    Inductor's cache does not key on ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA: kernels cached by an
    uncapped run and reused under the AVX2 cap of `.ci/run` return wrong numbers, then crash.
    Subprocesses inherit the variable, so the CLI tests use the same folder.
    """
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    isa = "-".join(
        [torch.backends.cpu.get_cpu_capability().lower()]
        + [os.environ[k].lower() for k in ("ONEDNN_MAX_CPU_ISA", "TIEDLM_CPU_ISA") if os.environ.get(k)]
    )
    folder = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}" / f"tiedlm-tests-{isa}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


_inductor_cache_for_this_isa()


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def config_file(tmp_path: Path, corpus_dir: Path) -> Path:
    return write_config(tmp_path / "tiny.toml", corpus_dir)


@pytest.fixture(scope="session")
def trained_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The config ``trained_run`` was trained from (a resume of it must name the same corpus)."""
    root = tmp_path_factory.mktemp("trained")
    return write_config(root / "tiny.toml", write_corpus(root / "corpus"))


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def trained_run(trained_config: Path):
    """A tiny run, trained once per session and shared by every test that only reads it.

    A test that writes into a run folder (damages it, resumes it, trains into it) takes
    ``trained_run_copy``; the check after the session catches one that writes here instead.
    """
    run = trained_config.parent / "run"
    assert main(["train", str(trained_config), "--out", str(run)]) == 0
    written = _contents(run)
    yield run
    assert _contents(run) == written, "a test changed the shared trained_run: give it trained_run_copy"


@pytest.fixture
def trained_run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of ``trained_run`` of the test's own, for tests that write into it."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture
def one_thread():
    """Tiny problems run faster on one thread, much faster on a busy CPU (the count is put back after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tests whose outcome depends on the CPU's kernels (bf16, oneDNN, the hand-written recurrences):
# `pytest -m kernels` runs only them (.ci/run runs the whole suite a second time under the AVX2 cap).
KERNEL_MODULES = {
    "test_precision.py", "test_model.py", "test_loss.py", "test_train.py", "test_bench.py",
    "test_rhn.py", "test_transformer.py",
}  # fmt: skip
KERNEL_TESTS = {"test_eval_both_splits_and_batch_size_one"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in KERNEL_MODULES or item.originalname in KERNEL_TESTS:
            item.add_marker(pytest.mark.kernels)
