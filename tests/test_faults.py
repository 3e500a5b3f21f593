"""Faults: SIGKILL, signals, damaged checkpoints, NaNs, locked and full output folders."""

import json
import random
import signal

import pytest
import torch

from tiedlm.checkpoint import load_checkpoint, run_checkpoints
from tiedlm.cli import main
from tiedlm.config import load_config
from tiedlm.errors import TiedlmError
from tiedlm.testing import (
    KILL_POINTS,
    fault_config,
    final_weights,
    finish,
    kill_randomly,
    same_weights,
    tiedlm,
    train_to_end,
    visible_files_intact,
    wait_for,
)
from tiedlm.training import RunLock, Trainer, TrainingStep, faults


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run in a child process: the weights every interrupted run must reach."""
    root = tmp_path_factory.mktemp("reference")
    config = fault_config(root)
    code, err = finish(tiedlm("train", config, "--out", root / "run"))
    assert code == 0, err
    return config, final_weights(root / "run"), json.loads((root / "run" / "final.json").read_text())


def assert_same_result(run, reference):
    _, weights, final = reference
    assert same_weights(final_weights(run), weights)
    assert json.loads((run / "final.json").read_text())["test_ppl"] == final["test_ppl"]
    assert visible_files_intact(run)


def test_sigkill_at_random_moments_then_resume(tmp_path, reference):
    config = reference[0]
    run = tmp_path / "run"
    rng = random.Random(7)
    for _ in range(3):
        kill_randomly(config, run, rng, window_s=4.0)
        assert visible_files_intact(run)
    train_to_end(config, run)
    assert_same_result(run, reference)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_inside_a_checkpoint_write_then_resume(tmp_path, reference, point):
    config = reference[0]
    run = tmp_path / "run"
    code, _ = finish(tiedlm("train", config, "--out", run, kill_at=(point, 3)))
    assert code == -signal.SIGKILL
    assert visible_files_intact(run)
    attempts = train_to_end(config, run)
    assert len(attempts) == 1  # one resume is enough
    assert_same_result(run, reference)
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_a_checkpoint_and_resume_is_exact(tmp_path, reference, signum, code):
    config = reference[0]
    run = tmp_path / "run"
    process = tiedlm("train", config, "--out", run)
    wait_for(run / "checkpoints" / "epoch-0001")
    process.send_signal(signum)
    returned, err = finish(process)
    assert returned == code, err
    assert "checkpoint" in err and "--resume" in err
    assert visible_files_intact(run)
    train_to_end(config, run)
    assert_same_result(run, reference)


class _ManualTimer:
    """Stands in for threading.Timer in tiedlm.cli: ``fire()`` runs its function when the test says."""

    made: list["_ManualTimer"] = []

    def __init__(self, seconds, function):
        self.seconds, self.function, self.cancelled = seconds, function, False
        _ManualTimer.made.append(self)

    def start(self):
        pass

    def cancel(self):
        self.cancelled = True

    def fire(self):
        if not self.cancelled:
            self.function()


def test_stop_after_ends_the_stretch_with_a_checkpoint_and_resume_is_exact(tmp_path, reference, monkeypatch, capsys):
    import tiedlm.cli

    config = reference[0]
    run = tmp_path / "run"
    _ManualTimer.made.clear()
    monkeypatch.setattr(tiedlm.cli.threading, "Timer", _ManualTimer)
    original, calls = TrainingStep.window_loss, [0]

    def window_loss(self, *args):  # the minutes are up in the middle of epoch 2
        calls[0] += 1
        if calls[0] == 30:
            _ManualTimer.made[-1].fire()
        return original(self, *args)

    monkeypatch.setattr(TrainingStep, "window_loss", window_loss)
    assert main(["train", str(config), "--out", str(run), "--stop-after", "90"]) == 143
    (timer,) = _ManualTimer.made
    assert timer.seconds == 90 * 60 and timer.cancelled  # and no SIGTERM is left pending for later
    err = capsys.readouterr().err
    assert "--stop-after 90: 90 minutes are up" in err and f"tiedlm train --resume {run}" in err
    assert "+" in run_checkpoints(run)[-1].name  # a mid-epoch checkpoint
    monkeypatch.setattr(TrainingStep, "window_loss", original)
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_result(run, reference)


@pytest.mark.parametrize("value", ["0", "-1", "inf", "soon"])
def test_stop_after_needs_a_positive_number_of_minutes(capsys, tmp_path, value):
    for command in (["train", "c.toml"], ["reproduce", "ptb-small"]):
        assert main([*command, "--stop-after", value]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "--stop-after" in line and "positive number of minutes" in line


def test_second_sigint_exits_at_once_without_damage(tmp_path, reference):
    config = reference[0]
    run = tmp_path / "run"
    process = tiedlm("train", config, "--out", run)
    wait_for(run / "checkpoints" / "epoch-0001")
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    returned, _ = finish(process)
    assert returned == 130
    assert visible_files_intact(run)
    train_to_end(config, run)
    assert_same_result(run, reference)


def _stop_at(monkeypatch, trainer: Trainer, calls: set[int], signum=signal.SIGINT):
    """Make ``trainer`` see a signal during the given window_loss calls (counted from 1)."""
    original = TrainingStep.window_loss
    count = [0]

    def window_loss(self, *args):
        count[0] += 1
        if count[0] in calls:
            trainer.stop_signal = signum
        return original(self, *args)

    monkeypatch.setattr(TrainingStep, "window_loss", window_loss)


def test_mid_epoch_checkpoint_resumes_bit_exactly(tmp_path, config_file, monkeypatch):
    straight = Trainer(load_config(config_file), tmp_path / "straight", echo=lambda *a: None)
    straight.fit()
    stopped = Trainer(load_config(config_file), tmp_path / "split", echo=lambda *a: None)
    _stop_at(monkeypatch, stopped, {90})  # epoch 1 has 74 windows: call 90 is window 15 of epoch 2
    with pytest.raises(faults.Interrupted) as info:
        stopped.fit()
    assert info.value.exit_code == 130
    names = [p.name for p in run_checkpoints(tmp_path / "split")]
    assert names[-1].startswith("epoch-0001+")  # after epoch 1 and some windows of epoch 2
    monkeypatch.undo()
    Trainer(load_config(config_file), tmp_path / "split", resume=tmp_path / "split", echo=lambda *a: None).fit()
    assert same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "split"))
    metrics = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_ppl"] for m in metrics] == [m["train_ppl"] for m in reference]


# --- damaged checkpoints -----------------------------------------------------------------------------------


def test_truncated_checkpoint_is_named_and_resume_falls_back(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(run), "--set", "train.max_epochs=3"]) == 0
    reference = final_weights(run)
    latest = run_checkpoints(run)[-1]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(TiedlmError, match=r"epoch-0003/model.safetensors: SHA-256 does not match"):
        load_checkpoint(latest)
    (run / "final.json").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_epochs=3"]) == 0
    err = capsys.readouterr().err
    assert "epoch-0003/model.safetensors" in err and "falling back" in err and "epoch-0002" in err
    assert same_weights(final_weights(run), reference)  # the lost epoch is trained again, identically


def test_altered_manifest_and_missing_file_are_named(trained_run_copy):
    best = trained_run_copy / "best"
    (best / "vocab.txt").unlink()
    with pytest.raises(TiedlmError, match=r"best/vocab.txt: missing"):
        load_checkpoint(best)
    (best / "manifest.json").write_text("{not json")
    with pytest.raises(TiedlmError, match=r"best/manifest.json: unreadable or altered"):
        load_checkpoint(best)


def test_resume_with_every_checkpoint_damaged_is_an_error(capsys, trained_run_copy):
    for folder in run_checkpoints(trained_run_copy):
        (folder / "model.safetensors").write_bytes(b"")
    assert main(["train", "--resume", str(trained_run_copy)]) == 2
    assert "no intact checkpoint left" in capsys.readouterr().err


# --- numerical faults --------------------------------------------------------------------------------------


def _inject_nan(monkeypatch, calls: set[int]):
    original = TrainingStep.window_loss
    count = [0]

    def window_loss(self, *args):
        count[0] += 1
        ce, kl, state = original(self, *args)
        return (ce * float("nan"), kl, state) if count[0] in calls else (ce, kl, state)

    monkeypatch.setattr(TrainingStep, "window_loss", window_loss)


def test_a_nan_step_is_skipped_and_logged(tmp_path, config_file, monkeypatch, capsys):
    _inject_nan(monkeypatch, {5})
    Trainer(load_config(config_file), tmp_path / "run").fit()
    err = capsys.readouterr().err
    assert "epoch 1 window 4: non-finite loss or gradient, step skipped" in err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in load_checkpoint(tmp_path / "run").model.parameters())


def test_consecutive_nans_restore_the_last_checkpoint_with_half_the_lr(tmp_path, config_file, monkeypatch, capsys):
    # Epoch 1 has 74 windows; calls 80-82 fall in epoch 2 and trigger a rollback to epoch-0001.
    _inject_nan(monkeypatch, {80, 81, 82})
    config = load_config(config_file, ["train.nonfinite_patience=3"])
    report = Trainer(config, tmp_path / "run", echo=lambda *a: None).fit()
    err = capsys.readouterr().err
    assert "3 non-finite steps in a row: restored" in err and "epoch-0001" in err and "scale 0.5" in err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[1]["lr"] == pytest.approx(0.8 * 0.5)  # the schedule's lr, halved
    assert report["valid_ppl"] < 40


# --- output safety -----------------------------------------------------------------------------------------


def test_locked_output_folder_is_refused(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run)
    try:
        assert main(["train", str(config_file), "--out", str(run)]) == 2
        assert "another tiedlm process" in capsys.readouterr().err
    finally:
        lock.release()
    assert main(["train", str(config_file), "--out", str(run)]) == 0  # free again


def test_unwritable_output_folder_is_detected_before_training(tmp_path, config_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", str(config_file), "--out", str(blocker / "run")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_full_disk_is_detected_before_training(tmp_path, config_file, monkeypatch, capsys):
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda path: type("U", (), {"free": 1024})())
    assert main(["train", str(config_file), "--out", str(tmp_path / "run")]) == 2
    assert "MiB free" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- determinism -------------------------------------------------------------------------------------------


def test_same_seed_same_losses(tmp_path, config_file):
    for name in ("a", "b"):
        Trainer(load_config(config_file), tmp_path / name, echo=lambda *a: None).fit()
    lines = [(tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in ("a", "b")]
    a, b = ([json.loads(x) for x in ls] for ls in lines)
    assert [(m["train_ppl"], m["valid_ppl"]) for m in a] == [(m["train_ppl"], m["valid_ppl"]) for m in b]
    other = load_config(config_file, ["seed=4"])
    Trainer(other, tmp_path / "c", echo=lambda *a: None).fit()
    c = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert c[0]["train_ppl"] != a[0]["train_ppl"]


def test_signal_during_set_up_stops_at_the_first_checkpoint(tmp_path, config_file):
    import os

    previous = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(load_config(config_file), tmp_path / "run", echo=lambda *a: None)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the trainer's handler is already installed
    with pytest.raises(faults.Interrupted) as info:
        trainer.fit()
    assert info.value.exit_code == 143
    assert [p.name for p in run_checkpoints(tmp_path / "run")] == ["epoch-0000"]
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers given back


def test_sigterm_outside_training_exits_143(monkeypatch, trained_run):
    import os

    from tiedlm import cli

    def terminated_eval(args):
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. while evaluating: no trainer handler here
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setitem(cli.COMMANDS, "eval", terminated_eval)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", str(trained_run)])
    assert info.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is previous


def test_signal_during_the_final_evaluation_still_exits_with_its_code(tmp_path, config_file, monkeypatch):
    trainer = Trainer(load_config(config_file), tmp_path / "run", echo=lambda *a: None)
    original = Trainer.final_report

    def final_report(self):
        self.stop_signal = signal.SIGINT  # as if Ctrl-C came while valid/test were being scored
        return original(self)

    monkeypatch.setattr(Trainer, "final_report", final_report)
    with pytest.raises(faults.Interrupted) as info:
        trainer.fit()
    assert info.value.exit_code == 130
    assert (tmp_path / "run" / "final.json").exists()  # the run itself is complete


def test_the_fault_hook_names_a_bad_setting_and_ignores_other_points(monkeypatch):
    from tiedlm.checkpoint import FAULT_ENV, fault_point
    from tiedlm.errors import TiedlmError

    monkeypatch.setenv(FAULT_ENV, "_seal:two")
    with pytest.raises(TiedlmError, match="TIEDLM_FAULT_AT: expected POINT:N"):
        fault_point("_seal")
    monkeypatch.setenv(FAULT_ENV, "remove_dir:1")
    fault_point("_seal")  # another point: nothing happens (the named one would kill this process)
