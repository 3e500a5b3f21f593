"""Continuing a run (``tiedlm train --resume``): which run and config, which checkpoint, which corpus.

On resume the config's ``data`` and ``model`` sections must match the checkpoint's (``--set``
may change ``train.*``); the corpus may have moved if its SHA-256 still match
(docs/checkpoints.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tiedlm.checkpoint import MODEL_FILE, Checkpoint, load_checkpoint, load_latest_good
from tiedlm.config import Config, apply_overrides, config_from_dict, load_config
from tiedlm.data import BUNDLED, Corpus, load_corpus
from tiedlm.errors import TiedlmError
from tiedlm.run_folder import run_folder_of
from tiedlm.training.faults import say


def resolve_run(
    config_file: str | None, overrides: list[str], out: str | None, resume: str | None
) -> tuple[Config, Path]:
    """The config and run folder of ``tiedlm train [CONFIG] [--out DIR] [--resume DIR] [--set …]``.

    A fresh run goes to ``--out``, else ``runs/<config name>``. A resumed run continues in its own
    folder, with the CONFIG given or else the checkpoint's own config (``--set`` applied to either).
    """
    if config_file is None and resume is None:
        raise TiedlmError("train: give a CONFIG, or --resume DIR")
    if resume is None:
        config = load_config(config_file, overrides)
        return config, Path(out) if out else Path("runs") / config.name
    source, run_dir = Path(resume), run_folder_of(Path(resume))
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise TiedlmError(f"--out {out}: a resumed run continues in its own folder {run_dir}")
    if config_file is not None:
        return load_config(config_file, overrides), run_dir
    checkpoint = load_checkpoint(source) if source != run_dir else load_latest_good(run_dir)[0]
    saved = checkpoint.config.to_dict()  # apply_overrides blames a bad value on its --set
    return config_from_dict(apply_overrides(saved, overrides), f"checkpoint {checkpoint.path}"), run_dir


def latest_good(run_dir: Path, device: torch.device) -> Checkpoint:
    """The run's newest intact checkpoint, with a note for every damaged newer one it skipped."""
    checkpoint, skipped = load_latest_good(run_dir, device)
    for note in skipped:
        say(f"skipping a damaged checkpoint: {note}")
    return checkpoint


def find_resume_checkpoint(resume: Path, device: torch.device) -> Checkpoint:
    """The checkpoint ``--resume`` continues from: the folder given, or a run's newest intact one."""
    if (resume / MODEL_FILE).exists():
        checkpoint = load_checkpoint(resume, device)
    else:
        checkpoint, skipped = load_latest_good(resume, device)
        for note in skipped:
            say(f"skipping a damaged checkpoint: {note}")
        if skipped:
            say(f"falling back to the previous good checkpoint {checkpoint.path}")
    if not checkpoint.trainer_state:
        raise TiedlmError(f"--resume {resume}: {checkpoint.path} has no trainer state (not a training checkpoint)")
    return checkpoint


def check_resume_config(saved: Config, given: Config) -> None:
    for section in ("data", "model"):
        a, b = getattr(saved, section).__dict__, getattr(given, section).__dict__
        changed = [k for k in a if a[k] != b[k] and (section, k) != ("data", "corpus")]  # see resume_corpus
        if changed:
            key = f"{section}.{changed[0]}"
            raise TiedlmError(
                f"--resume: {key} is {b[changed[0]]!r} in the config but {a[changed[0]]!r} in the checkpoint"
            )


def corpus_location(corpus: str) -> str:
    """``data.corpus`` as a run records it: a directory as an absolute path, so that the run can be
    resumed (and its checkpoints evaluated) from any working directory; a bundled or fetched corpus by name."""
    if corpus in BUNDLED or not Path(corpus).is_dir():
        return corpus
    return os.path.abspath(corpus)


def resume_corpus(checkpoint: Checkpoint, given: str) -> Corpus:
    """Load the corpus a resumed run continues on, and check that it is the one it started on.

    Checkpoints record the corpus's location and the SHA-256 of its three files: a corpus
    given elsewhere (``--set data.corpus=NEW`` after a move) is accepted when they match and
    refused when they do not. Checkpoints of older versions record neither; then only the
    vocabulary is checked, as it was.
    """
    recorded = checkpoint.trainer_state.get("corpus") or {}
    was = recorded.get("corpus", checkpoint.config.data.corpus)
    try:
        corpus = load_corpus(given, vocab=checkpoint.vocab)
    except TiedlmError as exc:
        if given != was or given in BUNDLED:
            raise
        if not Path(given).is_absolute():  # as earlier versions recorded it
            raise TiedlmError(
                f"--resume: the run's corpus {given!r} is relative to the folder the run was started in; "
                f"resume from there, or give --set data.corpus=DIR ({exc})"
            ) from None
        raise TiedlmError(
            f"--resume: cannot read the run's corpus ({exc}); if it moved, give --set data.corpus=NEW_DIR "
            "(its SHA-256 must match the recorded ones)"
        ) from None
    moved = corpus_location(given) != was
    digests = recorded.get("sha256") or {}
    changed = [name for name, digest in digests.items() if corpus.sha256.get(name) != digest]
    if changed:
        name = changed[0]
        raise TiedlmError(
            f"data.corpus {given!r}: its {name} (SHA-256 {corpus.sha256.get(name, '?')[:12]}…) is not the one the run "
            f"was trained on ({was}, {digests[name][:12]}…); refusing to resume on other data"
        )
    if moved:
        checked = "SHA-256 of train, valid and test match" if digests else "no checksums recorded: vocabulary checked"
        say(f"corpus moved: {was} → {corpus_location(given)} ({checked})")
    return corpus
