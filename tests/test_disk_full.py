"""A disk that fills up during a run (after the start-up free-space check passed).

ENOSPC is injected where the system would report it: in the weights file that safetensors
writes (it reports "… (os error 28)"), or in the fsync that flushes a file or folder to disk
(where delayed allocation reports it). Each write must end in one line that says how much
space it needs, leave the previous checkpoints, best/ and final.json as they were, leave no
temporary folder behind, and a resume after freeing space must reach the weights of a run
that never failed.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from safetensors import SafetensorError

import tiedlm.checkpoint as checkpoint_module
from conftest import write_config, write_corpus
from tiedlm.checkpoint import run_checkpoints
from tiedlm.cli import main
from tiedlm.errors import DiskFull
from tiedlm.testing import final_weights, same_weights, visible_files_intact

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
OPTIONS = ["--set", "train.max_epochs=3", "--set", "train.max_steps_per_epoch=4"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("diskfull")
    return write_config(root / "c.toml", write_corpus(root / "corpus", words=600))


@pytest.fixture(scope="module")
def reference(config):
    """The same run without a fault: what every resumed run must end with."""
    run = config.parent / "reference"
    assert main(["train", str(config), "--out", str(run), *OPTIONS]) == 0
    return final_weights(run), json.loads((run / "final.json").read_text())["test_ppl"]


def fsync_fails_for(monkeypatch, fragment: str) -> list[str]:
    """os.fsync raises ENOSPC for every file or folder whose path contains ``fragment``."""
    real, hits = os.fsync, []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if fragment in target:
            hits.append(target)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hits


def no_leftovers(run: Path) -> bool:
    return not [p for p in run.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def assert_disk_full_error(capsys, run: Path) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    message = err[0]
    assert message.startswith("tiedlm: error: ") and "no space left on the device" in message, err
    assert "needs about" in message and ("KiB" in message or "MiB" in message)
    assert "nothing that was there before was changed" in message
    assert f"then continue with: tiedlm train --resume {run}" in message
    return message


def resume_to_the_end(run: Path, reference) -> None:
    assert main(["train", "--resume", str(run)]) == 0
    weights, test_ppl = reference
    assert same_weights(final_weights(run), weights)
    assert json.loads((run / "final.json").read_text())["test_ppl"] == test_ppl
    assert visible_files_intact(run) and no_leftovers(run)


def test_disk_full_while_writing_a_checkpoint(capsys, monkeypatch, tmp_path, config, reference):
    run = tmp_path / "run"
    real, calls = checkpoint_module.save_model, []

    def save_model(model, filename, *args, **kwargs):  # the epoch-2 checkpoint: half a file, then ENOSPC
        calls.append(filename)
        if "epoch-0002.tmp" in filename:
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(model, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_model", save_model)
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(run), *OPTIONS]) == 2
    message = assert_disk_full_error(capsys, run)
    assert f"checkpoint {run / 'checkpoints' / 'epoch-0002'}" in message
    assert [p.name for p in run_checkpoints(run)] == ["epoch-0000", "epoch-0001"]  # the previous two, intact
    assert visible_files_intact(run) and no_leftovers(run) and not (run / "final.json").exists()
    monkeypatch.setattr(checkpoint_module, "save_model", real)  # space freed
    resume_to_the_end(run, reference)


def test_disk_full_while_updating_best(capsys, monkeypatch, tmp_path, config, reference):
    run = tmp_path / "run"
    hits = fsync_fails_for(monkeypatch, "/.best.tmp-")  # the first best/ (after epoch 1)
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(run), *OPTIONS]) == 2
    assert hits
    message = assert_disk_full_error(capsys, run)
    assert f"checkpoint {run / 'best'}" in message
    assert not (run / "best").exists() and [p.name for p in run_checkpoints(run)] == ["epoch-0000", "epoch-0001"]
    assert visible_files_intact(run) and no_leftovers(run)
    monkeypatch.undo()
    resume_to_the_end(run, reference)  # resume also puts best/ in place


def test_disk_full_while_writing_final_json(capsys, monkeypatch, tmp_path, config, reference):
    run = tmp_path / "run"
    hits = fsync_fails_for(monkeypatch, "/.final.json.tmp-")
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(run), *OPTIONS]) == 2
    assert hits
    message = assert_disk_full_error(capsys, run)
    assert f"{run / 'final.json'}: no space left" in message
    assert not (run / "final.json").exists() and visible_files_intact(run) and no_leftovers(run)
    monkeypatch.undo()
    resume_to_the_end(run, reference)


def test_disk_full_in_save_pretrained_leaves_the_old_checkpoint(monkeypatch, tmp_path):
    import tiedlm
    from test_validation import make_lm

    saved = make_lm(seed=1).save_pretrained(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    fsync_fails_for(monkeypatch, "/.model.tmp-")
    with pytest.raises(DiskFull, match=rf"checkpoint {tmp_path / 'model'}: no space left on the device \(it needs"):
        make_lm(seed=2).save_pretrained(saved, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert tiedlm.LanguageModel.from_pretrained(saved).vocab == make_lm().vocab
