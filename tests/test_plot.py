"""Seeing training: `tiedlm plot`, TensorBoard logging, the run ETA on the progress bar."""

import pytest

import tiedlm.training.loop
import tiedlm.training.records
from tiedlm.cli import main
from tiedlm.config import load_config
from tiedlm.training import Trainer


def test_plot_writes_a_png_of_several_runs(trained_run, tmp_path, config_file, capsys):
    other = tmp_path / "other"
    assert main(["train", str(config_file), "--out", str(other), "--set", "train.max_epochs=3"]) == 0
    out = tmp_path / "plots" / "runs.png"
    assert main(["plot", str(trained_run), str(other), "--out", str(out), "--labels", "two,three"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert f"wrote {out}" in capsys.readouterr().out


def test_perplexity_axis_labels_plain_numbers_and_whole_epochs():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tiedlm.plot import perplexity_axis

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3, 4], [229.3, 183.2, 163.7, 155.2])  # less than a decade: minor ticks carry the labels
    perplexity_axis(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels(minor=True) + ax.get_yticklabels() if t.get_text()]
    xs = [t.get_position()[0] for t in ax.get_xticklabels()]
    plt.close(fig)
    assert "160" in labels and all(label.isdigit() for label in labels), labels
    assert xs and all(float(x).is_integer() for x in xs), xs


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "a,b,c"], "--labels: 3 labels for 1 runs"),
        (["--out", "x.jpg"], "expected a .png"),
    ],
)
def test_plot_bad_options(trained_run, capsys, extra, message):
    assert main(["plot", str(trained_run), *extra]) == 2
    assert message in capsys.readouterr().err


def test_plot_needs_run_folders(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 2
    assert "not a run folder (no metrics.jsonl)" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("{broken\n")
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 2
    assert "metrics.jsonl:1: not a JSON line" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_epoch_when_installed(tmp_path, config_file, monkeypatch):
    writers = []
    fake = lambda path: writers.append(FakeWriter()) or writers[-1]  # noqa: E731
    monkeypatch.setattr(tiedlm.training.loop, "tensorboard_writer", fake)
    Trainer(load_config(config_file), tmp_path / "run", echo=lambda *a, **k: None).fit()
    [writer] = writers
    assert {(k, s) for k, _, s in writer.scalars} >= {("valid_ppl", 1), ("valid_ppl", 2), ("train_ppl", 2), ("lr", 1)}
    assert writer.closed
    # Off by setting:
    writers.clear()
    config = load_config(config_file, ["train.tensorboard=false"])
    Trainer(config, tmp_path / "run2", echo=lambda *a, **k: None).fit()
    assert writers == []


def test_without_the_tensorboard_package_nothing_is_logged(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert tiedlm.training.records.tensorboard_writer(tmp_path / "tb") is None


def test_run_eta(tmp_path, config_file):
    trainer = Trainer(load_config(config_file, ["train.max_epochs=40"]), tmp_path / "run", echo=lambda *a, **k: None)
    try:
        assert trainer._run_eta(1) == "?"
        trainer.progress.last_epoch_s = 60.0
        assert trainer._run_eta(30) == "≤10m" and trainer._run_eta(10) == "≤30m" and trainer._run_eta(40) == "0m"
        trainer.progress.last_epoch_s = 600.0
        assert trainer._run_eta(30) == "≤1.7h"
    finally:
        trainer._release()
