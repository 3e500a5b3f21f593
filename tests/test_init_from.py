"""train.init_from: a new run started from another run's weights (the paper's second stage for PTB small)."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from tiedlm.checkpoint import manifest_digest
from tiedlm.cli import main


def read(path):
    return json.loads(path.read_text())


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_second_stage_starts_from_the_first_ones_best_weights(tmp_path, trained_run, config_file):
    stage2 = tmp_path / "stage2"
    code = main(
        ["train", str(config_file), "--out", str(stage2), "--set", f"train.init_from={trained_run}",
         "--set", "train.max_epochs=1"]
    )  # fmt: skip
    assert code == 0
    # Its epoch-0000 holds the source's best weights, untouched by training.
    source = load_file(str(trained_run / "best" / "model.safetensors"))
    start = load_file(str(stage2 / "checkpoints" / "epoch-0000" / "model.safetensors"))
    assert source.keys() == start.keys() and all(torch.equal(source[k], start[k]) for k in source)
    # A fresh schedule and counters: epoch 1 again, at the config's lr, not the source's decayed one.
    (record,) = metrics(stage2)
    assert record["epoch"] == 1 and record["lr"] == 1.0
    # Starting from trained weights, its first epoch beats the source's first epoch.
    assert record["valid_ppl"] < metrics(trained_run)[0]["valid_ppl"]
    for name in ("run.json", "final.json"):
        info = read(stage2 / name)["init_from"]
        assert info["checkpoint"] == str((trained_run / "best").resolve())
        assert info["manifest_sha256"] == manifest_digest(trained_run / "best")
        assert info["epoch"] == read(trained_run / "final.json")["best_epoch"]


def test_a_run_started_from_another_resumes_like_any_other(tmp_path, trained_run, config_file):
    straight, split = tmp_path / "straight", tmp_path / "split"
    init = f"train.init_from={trained_run}"
    assert main(["train", str(config_file), "--out", str(straight), "--set", init]) == 0
    assert main(["train", str(config_file), "--out", str(split), "--set", init, "--set", "train.max_epochs=1"]) == 0
    assert main(["train", "--resume", str(split), "--set", "train.max_epochs=2"]) == 0
    assert [m["valid_ppl"] for m in metrics(split)] == [m["valid_ppl"] for m in metrics(straight)]
    assert read(split / "final.json")["init_from"] == read(straight / "final.json")["init_from"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.hidden_size=16", "model.hidden_size is 12 there but 16 here"),
        ("model.num_layers=1", "model.num_layers is 2 there but 1 here"),  # found by the weights' shapes
        ("model.tie_weights=false", "model.tie_weights is True there but False here"),
        ("model.output_bias=on", "output bias"),
    ],
)
def test_a_different_architecture_is_refused_naming_what_differs(
    tmp_path, trained_run, config_file, capsys, override, message
):
    code = main(
        ["train", str(config_file), "--out", str(tmp_path / "s2"), "--set", f"train.init_from={trained_run}",
         "--set", override]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tiedlm: error: train.init_from") and message in err and "\n" not in err


def test_a_different_vocabulary_is_refused(tmp_path, trained_run, capsys):
    from conftest import write_corpus

    other = write_config(tmp_path / "other.toml", write_corpus(tmp_path / "other", vocab=25))
    code = main(["train", str(other), "--out", str(tmp_path / "s2"), "--set", f"train.init_from={trained_run}"])
    assert code == 2
    assert "the vocabulary differs" in capsys.readouterr().err  # named before the embedding's shape


def test_weights_of_another_shape_are_refused_for_any_architecture(tmp_path, trained_run):
    """No list of shape settings per architecture: the weights' shapes decide, and every differing setting is named."""
    from tiedlm.checkpoint import init_weights_from, load_checkpoint
    from tiedlm.errors import TiedlmError
    from tiedlm.models import build_model

    source = load_checkpoint(trained_run)
    config = source.config
    wider = dataclasses.replace(config, model=dataclasses.replace(config.model, hidden_size=14, dropout=0.1))
    model = build_model(wider.model, len(source.vocab))
    with pytest.raises(TiedlmError) as caught:
        init_weights_from(model, wider, source.vocab, trained_run, "cpu")
    message = str(caught.value)
    assert "its weights do not fit this model" in message and "×12 there but" in message
    assert "model.hidden_size is 12 there but 14 here" in message and "model.dropout is" in message


def test_a_damaged_source_is_refused(tmp_path, trained_run_copy, config_file, capsys):
    weights = trained_run_copy / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    source = f"train.init_from={trained_run_copy}"
    code = main(["train", str(config_file), "--out", str(tmp_path / "s2"), "--set", source])
    assert code == 2
    assert "SHA-256 does not match" in capsys.readouterr().err
