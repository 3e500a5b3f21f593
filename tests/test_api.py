"""The Python API: LanguageModel.from_pretrained / save_pretrained / score / generate."""

import math

import pytest
import torch

import tiedlm
from tiedlm.cli import main
from tiedlm.errors import TiedlmError


def test_round_trip_keeps_weights_vocab_and_config(trained_run, tmp_path):
    lm = tiedlm.LanguageModel.from_pretrained(trained_run)
    saved = lm.save_pretrained(tmp_path / "saved")
    again = tiedlm.LanguageModel.from_pretrained(saved)
    assert again.vocab == lm.vocab and again.config == lm.config
    for (name, a), (_, b) in zip(lm.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The saved folder is a checkpoint the command line reads too.
    assert main(["eval", str(saved), "--split", "test"]) == 0


def test_score_matches_the_command_line(trained_run, tmp_path, capsys):
    lm = tiedlm.LanguageModel.from_pretrained(trained_run)
    texts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9"]
    scores = lm.score(texts, batch_size=2)
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    capsys.readouterr()
    assert main(["score", str(trained_run), str(tmp_path / "t.txt")]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()[1:]]
    for line, row in zip(scores.lines, rows, strict=False):
        assert line.logprob == pytest.approx(float(row[1]), abs=1e-3) and line.tokens == int(row[2])
    assert scores.tokens == 3 + 1 + 1 + 1 + 5 + 1
    assert scores.perplexity == pytest.approx(math.exp(-scores.logprob / scores.tokens))
    assert lm.score("w1 w2 w3").lines[0].logprob == pytest.approx(scores.lines[0].logprob, abs=1e-5)


def test_generate_single_and_batched(trained_run):
    lm = tiedlm.LanguageModel.from_pretrained(trained_run)
    one = lm.generate("w1 w2", words=8, temperature=0)
    assert isinstance(one, str) and one.startswith("w1 w2")
    many = lm.generate(["w1 w2", "w5", "w3 w3 w3"], words=8, temperature=0)
    assert isinstance(many, list) and len(many) == 3
    # Greedy decoding of a prompt does not depend on what else is in the batch.
    assert many[0] == one and many[1] == lm.generate("w5", words=8, temperature=0)
    assert many[2].startswith("w3 w3 w3")
    # Sampling is repeatable with a seed, and top_k=1 is greedy.
    sampled = lm.generate(["w1", "w2"], words=12, temperature=1.0, seed=4)
    assert sampled == lm.generate(["w1", "w2"], words=12, temperature=1.0, seed=4)
    assert lm.generate("w1", words=6, top_k=1, seed=9) == lm.generate("w1", words=6, temperature=0)


def test_generate_rejects_bad_settings(trained_run):
    lm = tiedlm.LanguageModel.from_pretrained(trained_run)
    with pytest.raises(TiedlmError, match="temperature"):
        lm.generate("w1", temperature=-1)
    with pytest.raises(TiedlmError, match="top_k"):
        lm.generate("w1", top_k=-2)


def test_from_pretrained_errors_name_the_folder(tmp_path):
    with pytest.raises(TiedlmError, match="nowhere"):
        tiedlm.LanguageModel.from_pretrained(tmp_path / "nowhere")


def test_repr_names_the_model(trained_run):
    text = repr(tiedlm.LanguageModel.from_pretrained(trained_run))
    assert "lstm" in text and "tied = True" in text
