"""A run folder written by tiedlm 0.1.0 still evaluates, loads and resumes (tests/fixtures/README.md)."""

import json
import shutil
from pathlib import Path

import pytest

import tiedlm
from tiedlm.checkpoint import run_checkpoints
from tiedlm.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """A copy of the fixture next to its corpus, run from their folder: the run's config names
    its corpus as the relative path ``v0_1_corpus``, and resuming writes into the run."""
    shutil.copytree(FIXTURES / "v0_1_run", tmp_path / "v0_1_run")
    shutil.copytree(FIXTURES / "v0_1_corpus", tmp_path / "v0_1_corpus")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "v0_1_run"


def _eval(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_old_run_evaluates_to_its_recorded_perplexity(old_run, capsys):
    final = json.loads((old_run / "final.json").read_text())
    assert _eval(capsys, old_run, "--split", "valid")["perplexity"] == pytest.approx(final["valid_ppl"], rel=1e-6)
    assert _eval(capsys, old_run, "--split", "test")["perplexity"] == pytest.approx(final["test_ppl"], rel=1e-6)
    # the same checkpoint against its corpus given explicitly, and a training checkpoint rather than best/
    explicit = _eval(capsys, old_run / "checkpoints" / "epoch-0001", "--split", "test", "--data", "v0_1_corpus")
    assert explicit["perplexity"] == pytest.approx(final["test_ppl"], rel=1e-6)


def test_old_run_loads_through_the_api(old_run):
    lm = tiedlm.LanguageModel.from_pretrained(old_run)
    assert len(lm.vocab.itos) == 32 and lm.model.decoder.weight is lm.model.embedding.weight
    score = lm.score("w1 w4 w7")
    assert score.tokens == 4 and score.logprob < 0


def test_old_run_resumes_for_another_epoch_and_evaluates(old_run, capsys):
    before = (old_run / "checkpoints" / "epoch-0001" / "model.safetensors").read_bytes()
    assert main(["train", "--resume", str(old_run), "--set", "train.max_epochs=2"]) == 0
    records = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "event" not in r] == [1, 2]
    assert [p.name for p in run_checkpoints(old_run)] == ["epoch-0001", "epoch-0002"]
    assert (old_run / "checkpoints" / "epoch-0002" / "model.safetensors").read_bytes() != before
    final = json.loads((old_run / "final.json").read_text())
    assert final["epochs"] == 2 and final["best_epoch"] in (1, 2)
    assert _eval(capsys, old_run, "--split", "test")["perplexity"] == pytest.approx(final["test_ppl"], rel=1e-6)
    assert len(json.loads((old_run / "run.json").read_text())["resumed"]) == 1
