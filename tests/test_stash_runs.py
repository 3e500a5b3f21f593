"""scripts/stash_runs.py: a run stashed, restored on another "machine" and resumed ends where it would have."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tiedlm.cli import main
from tiedlm.testing import final_weights, same_weights

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("stash_runs", ROOT / "scripts" / "stash_runs.py")
stash_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stash_runs)


@pytest.fixture
def runs(tmp_path, config_file, one_thread):
    """RUNS/straight: 2 epochs; RUNS/table/half: the same config stopped after 1 (and a fake mid-epoch checkpoint)."""
    runs = tmp_path / "runs"
    assert main(["train", str(config_file), "--out", str(runs / "straight")]) == 0
    half = runs / "table" / "half"
    assert main(["train", str(config_file), "--out", str(half), "--set", "train.max_epochs=1"]) == 0
    (half / "final.json").unlink()  # as if the run had been stopped at the end of epoch 1
    shutil.copytree(half / "checkpoints" / "epoch-0001", half / "checkpoints" / "epoch-0001+000002")
    return runs


def test_a_restored_run_resumes_to_the_weights_of_an_unbroken_one(runs, tmp_path, capsys):
    stash = tmp_path / "repo" / "stash"
    assert stash_runs.main(["save", str(runs), str(stash), str(runs / "table" / "half")]) == 0
    assert "stashed table/half at epoch-0001" in capsys.readouterr().out
    # the end-of-epoch checkpoint is kept, the newer mid-epoch one left out
    assert [p.name for p in (stash / "table" / "half" / "checkpoints").iterdir()] == ["epoch-0001"]
    index = json.loads((stash / "stash.json").read_text())
    assert index["runs"] == {"table/half": {"checkpoint": "epoch-0001", "finished": False}}

    shutil.rmtree(runs / "table")  # the machine is lost
    assert stash_runs.main(["restore", str(stash), str(runs)]) == 0
    assert "restored table/half" in capsys.readouterr().out
    half = runs / "table" / "half"
    assert main(["train", "--resume", str(half), "--set", "train.max_epochs=2"]) == 0
    assert same_weights(final_weights(half), final_weights(runs / "straight"))

    # a second restore leaves the (newer) run folder alone
    assert stash_runs.main(["restore", str(stash), str(runs)]) == 0
    assert "restored nothing" in capsys.readouterr().out
    assert json.loads((half / "final.json").read_text())["best_epoch"] == 2


def test_save_replaces_the_stash_and_refuses_what_it_cannot_resume(runs, tmp_path, capsys):
    stash = tmp_path / "stash"
    assert stash_runs.main(["save", str(runs), str(stash), str(runs / "straight"), str(runs / "table" / "half")]) == 0
    assert stash_runs.main(["save", str(runs), str(stash), str(runs / "table" / "half")]) == 0
    assert not (stash / "straight").exists(), "a run left out of a save leaves the stash"
    before = sorted(p.relative_to(stash) for p in stash.rglob("*"))
    capsys.readouterr()

    # a damaged checkpoint, a folder that is no run, a run outside RUNS: one line each, the stash untouched
    model = runs / "table" / "half" / "checkpoints" / "epoch-0001" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-8])
    for run_dir, message in [
        (runs / "table" / "half", "SHA-256 does not match"),
        (runs / "table", "not a run folder"),
        (tmp_path, f"not under {runs}"),
    ]:
        assert stash_runs.main(["save", str(runs), str(stash), str(run_dir)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("stash_runs: ") and message in err and err.count("\n") == 1
        assert sorted(p.relative_to(stash) for p in stash.rglob("*")) == before

    assert stash_runs.main(["restore", str(tmp_path / "nowhere"), str(runs)]) == 1
    assert "cannot read the stash's index" in capsys.readouterr().err
