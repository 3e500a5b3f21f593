import json

import pytest
import torch
from safetensors.torch import load_file

from tiedlm.checkpoint import load_checkpoint, run_checkpoints
from tiedlm.cli import main
from tiedlm.config import TrainConfig, load_config
from tiedlm.training import Trainer, learning_rate


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_learning_rate_schedule():
    config = TrainConfig(lr=1.0, lr_decay=0.5, lr_decay_start=3)
    assert [learning_rate(config, e) for e in range(1, 6)] == [1.0, 1.0, 0.5, 0.25, 0.125]


def test_training_writes_metrics_checkpoints_and_best(trained_run):
    metrics = read_metrics(trained_run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[1]["lr"] == pytest.approx(0.8)  # decay 0.8 from epoch 2
    assert metrics[1]["valid_ppl"] < metrics[0]["valid_ppl"] < 30  # it learns (vocabulary 32 words)
    assert {"train_ppl", "valid_ppl", "train_tokens_per_s", "train_kl", "best_valid_ppl"} <= metrics[0].keys()
    assert [p.name for p in run_checkpoints(trained_run)] == ["epoch-0001", "epoch-0002"]
    best = min(metrics, key=lambda m: m["valid_ppl"])["epoch"]
    torch.testing.assert_close(
        weights(trained_run / "best"), weights(trained_run / "checkpoints" / f"epoch-{best:04d}")
    )
    final = json.loads((trained_run / "final.json").read_text())
    assert final["valid_ppl"] == pytest.approx(min(m["valid_ppl"] for m in metrics), rel=1e-6)
    assert not list(trained_run.rglob(".*tmp*"))  # no temporary folders left behind
    checkpoint = load_checkpoint(trained_run)
    assert checkpoint.trainer_state["progress"]["best_epoch"] == best
    assert checkpoint.config.name == "tiny"
    assert json.loads((trained_run / "run.json").read_text())["torch"] == torch.__version__


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_resume_is_bit_exact(tmp_path, corpus_dir, mode):
    from conftest import write_config

    config = write_config(tmp_path / "c.toml", corpus_dir, mode=mode)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", str(config), "--out", str(straight)]) == 0
    assert main(["train", str(config), "--out", str(split), "--set", "train.max_epochs=1"]) == 0
    assert main(["train", str(config), "--resume", str(split)]) == 0
    a = weights(straight / "checkpoints" / "epoch-0002")
    b = weights(split / "checkpoints" / "epoch-0002")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(straight)[1]["valid_ppl"] == read_metrics(split)[1]["valid_ppl"]
    assert [m["epoch"] for m in read_metrics(split)] == [1, 2]


def test_resume_without_config_uses_the_checkpoint_config(tmp_path, config_file):
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(run), "--set", "train.max_epochs=1"]) == 0
    assert main(["train", "--resume", str(run), "--set", "train.max_epochs=2"]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]


def test_early_stopping_after_patience(tmp_path, config_file):
    # lr 0 never improves on epoch 1, so training stops after 1 + patience epochs.
    config = load_config(config_file, ["train.lr=0.0", "train.patience=2", "train.max_epochs=10"])
    report = Trainer(config, tmp_path / "run", echo=lambda *a, **k: None).fit()
    assert report["epochs"] == 3 and report["best_epoch"] == 1 and report["stopped_by"] == "patience"
    assert len(run_checkpoints(tmp_path / "run")) == 2  # only the last two are kept


def test_time_limit_stops_before_an_epoch_that_would_overrun(tmp_path, config_file):
    # Any real epoch takes longer than 1e-6 minutes, so the limit ends the run after epoch 1;
    # raising the limit on resume continues it.
    config = load_config(config_file, ["train.time_limit_minutes=1e-6", "train.max_epochs=5"])
    report = Trainer(config, tmp_path / "run", echo=lambda *a, **k: None).fit()
    assert report["epochs"] == 1 and report["stopped_by"] == "time_limit"
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.time_limit_minutes=0"]) == 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())["epochs"] == 5


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("augmented", [True, False])
def test_all_four_variants_train(tmp_path, corpus_dir, tie, augmented):
    from conftest import write_config

    config = load_config(
        write_config(tmp_path / "c.toml", corpus_dir, tie=tie, augmented=augmented), ["train.max_epochs=1"]
    )
    report = Trainer(config, tmp_path / "run", echo=lambda *a, **k: None).fit()
    assert report["valid_ppl"] < 40
    assert ("train_kl" in read_metrics(tmp_path / "run")[0]) == augmented


def test_diverged_training_is_a_clear_error(capsys, tmp_path, config_file):
    code = main(
        [
            "train",
            str(config_file),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "train.lr=1e30",
            "--set",
            "train.clip=0",
            "--set",
            "train.max_epochs=1",
        ]
    )
    assert code == 2
    assert "training diverged" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_bf16_training_tracks_fp32(tmp_path, mode):
    # At lr 1 this tiny problem is chaotic: fp32 itself moves by 2-6% with the thread count
    # or the seed, so nothing can be said about bf16 there. At lr 0.3 training is smooth and
    # the difference is precision only (measured: 0.06-0.3% over seeds 3-5, 1 and 2 threads).
    from conftest import write_config, write_corpus

    config_file = write_config(tmp_path / "c.toml", write_corpus(tmp_path / "corpus", words=4000), mode=mode)
    settings = ["model.hidden_size=32", "train.max_epochs=3", "train.lr=0.3"]
    results = {}
    for precision in ("fp32", "bf16"):
        config = load_config(config_file, [f"train.precision={precision}", *settings])
        results[precision] = Trainer(config, tmp_path / precision, echo=lambda *a: None).fit()["valid_ppl"]
    assert results["bf16"] == pytest.approx(results["fp32"], rel=0.01)
    assert results["bf16"] != results["fp32"]  # bf16 really ran


def test_compile_settings_compile_the_loss_and_the_forward(config_file):
    from tiedlm.models import build_model
    from tiedlm.training import TrainingStep

    def step(*settings):
        config = load_config(config_file, ["loss.augmented=true", *settings])
        model = build_model(config.model, 31)
        return model, TrainingStep(model, torch.optim.SGD(model.parameters(), lr=1.0), config)

    model, plain = step()
    assert plain.forward is model and not plain.augmented.compiled
    model, loss_only = step("train.compile=true")
    assert loss_only.forward is model and loss_only.augmented.compiled
    model, both = step("train.compile=true", "train.compile_model=true")
    assert both.forward is not model and hasattr(both.forward, "_orig_mod")


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, config_file):
    # Opt-in (-m slow): compiling takes ~40 s on 2 cores.
    eager = Trainer(load_config(config_file, ["train.max_epochs=1"]), tmp_path / "e", echo=lambda *a: None).fit()
    config = load_config(config_file, ["train.max_epochs=1", "train.compile=true", "train.compile_model=true"])
    compiled = Trainer(config, tmp_path / "c", echo=lambda *a: None).fit()
    assert compiled["valid_ppl"] == pytest.approx(eager["valid_ppl"], rel=1e-4)
