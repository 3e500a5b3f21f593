"""The analyses: subspace distance (exact linear algebra), the subspace experiment, predictions, neighbours."""

import csv
import json
import math
import re

import pytest
import torch

from tiedlm.analysis import (
    PredictionStats,
    SubspaceSettings,
    nearest_words,
    prediction_claims,
    prediction_study,
    subspace_distance,
    summarize_subspace,
    top_predictions,
    train_subspace,
)
from tiedlm.checkpoint import load_checkpoint
from tiedlm.cli import main
from tiedlm.data import Vocabulary, load_corpus


def test_distance_is_zero_in_the_same_space_and_one_when_orthogonal():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    embedding = basis[:, :5] @ torch.randn(5, 5, dtype=torch.float64)  # span = first 5 basis vectors
    same = basis[:, :5] @ torch.randn(5, 5, dtype=torch.float64)
    orthogonal = basis[:, 5:10] @ torch.randn(5, 5, dtype=torch.float64)
    assert subspace_distance(same, embedding) == pytest.approx(0.0, abs=1e-12)
    assert subspace_distance(orthogonal, embedding) == pytest.approx(1.0, abs=1e-12)
    # Half the energy inside, half outside: distance = sqrt(1/2).
    a, b = basis[:, 0:1], basis[:, 7:8]
    assert subspace_distance(a + b, embedding) == pytest.approx(math.sqrt(0.5), abs=1e-12)


def test_distance_ignores_how_the_space_is_spanned():
    torch.manual_seed(1)
    embedding = torch.randn(40, 4, dtype=torch.float64)
    weight = torch.randn(40, 3, dtype=torch.float64)
    mixed = embedding @ torch.randn(4, 4, dtype=torch.float64)  # the same column space
    rank_deficient = torch.cat([embedding, embedding[:, :1] * 2], dim=1)  # a repeated direction
    reference = subspace_distance(weight, embedding)
    assert subspace_distance(weight, mixed) == pytest.approx(reference, abs=1e-10)
    assert subspace_distance(weight, rank_deficient) == pytest.approx(reference, abs=1e-10)
    # Brute force: the least-squares residual of W on L.
    solution = torch.linalg.lstsq(embedding, weight).solution
    expected = torch.linalg.matrix_norm(weight - embedding @ solution) / torch.linalg.matrix_norm(weight)
    assert reference == pytest.approx(float(expected), abs=1e-10)


def test_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same number of rows"):
        subspace_distance(torch.ones(5, 2), torch.ones(6, 2))
    with pytest.raises(ValueError, match="zero"):
        subspace_distance(torch.zeros(5, 2), torch.ones(5, 2))


def test_augmented_loss_alone_keeps_w_in_the_embedding_space():
    # The experiment in miniature: with β = 1 the gradient of W lies in span(L) (+ the
    # all-ones direction), so W stays close to it; with β = 0 it does not.
    torch.manual_seed(0)
    ids = torch.randint(0, 60, (3000,))
    settings = SubspaceSettings(words=1400, hidden_size=8, epochs=2, batch_size=4, bptt=10)
    only_al = train_subspace(ids, 60, 1.0, 10.0, 1, settings)
    only_ce = train_subspace(ids, 60, 0.0, 10.0, 1, settings)
    assert only_al["slice_start"] == only_ce["slice_start"]  # one slice per seed
    assert only_al["distance"] < 0.5 < only_ce["distance"]
    assert len(only_al["curve"]) == 2


def test_summary_means_and_spreads():
    runs = [
        {"beta": 1.0, "tau": 10.0, "distance": 0.1},
        {"beta": 1.0, "tau": 10.0, "distance": 0.3},
        {"beta": 0.0, "tau": 10.0, "distance": 0.9},
    ]
    rows = {(r["beta"], r["tau"]): r for r in summarize_subspace(runs)}
    assert rows[(1.0, 10.0)]["distance_mean"] == pytest.approx(0.2)
    assert rows[(1.0, 10.0)]["distance_std"] == pytest.approx(math.sqrt(0.02))
    assert rows[(0.0, 10.0)]["runs"] == 1 and rows[(0.0, 10.0)]["distance_std"] == 0.0


def test_grid_shares_the_common_point():
    pairs = SubspaceSettings().grid()
    assert len(pairs) == 11 + 4 and len(set(pairs)) == len(pairs) and (1.0, 10.0) in pairs


def test_analyze_subspace_writes_csv_png_and_markdown(tmp_path):
    out = tmp_path / "results"
    args = ["analyze", "subspace", "--betas", "0,1", "--taus", "2,10", "--seeds", "1,2", "--epochs", "1"]
    assert main([*args, "--words", "1500", "--jobs", "1", "--out", str(out)]) == 0
    with open(out / "subspace.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["beta", "tau", "distance_mean", "distance_std", "runs"]
    assert {(float(r["beta"]), float(r["tau"])) for r in rows} == {(0.0, 10.0), (1.0, 10.0), (1.0, 2.0)}
    assert all(r["runs"] == "2" for r in rows)
    runs = [json.loads(line) for line in (out / "subspace-runs.jsonl").read_text().splitlines()]
    assert len(runs) == 6 and all(len(r["curve"]) == 1 for r in runs)
    assert (out / "subspace.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "subspace.md").read_text()
    assert "tiedlm analyze subspace --betas 0,1" in text and "≈ 0.06 at β = 1" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--betas", "0,1.5"], "--betas: 1.5 is outside [0, 1]"),
        (["--taus", "0"], "--taus: 0 must be > 0"),
        (["--seeds", "a"], "expected comma-separated integers"),
        (["--words", "99999999"], "fewer than --words"),
    ],
)
def test_analyze_subspace_bad_input(tmp_path, capsys, args, message):
    assert main(["analyze", "subspace", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "subspace.csv").exists()


def test_top_predictions_match_the_model(trained_run):
    checkpoint = load_checkpoint(trained_run)
    top, unknown = top_predictions(checkpoint.model, checkpoint.vocab, "w1 w4 zzz", k=5)
    assert unknown == ["zzz"] and len(top) == 5
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_prediction_study_over_a_split(trained_run):
    checkpoint = load_checkpoint(trained_run)
    corpus = load_corpus(checkpoint.config.data.corpus, vocab=checkpoint.vocab)
    embedding = checkpoint.model.embedding.weight
    stats = prediction_study(checkpoint.model, checkpoint.vocab, corpus.test, embedding, bptt=6, top_k=3,
                             frequent=len(checkpoint.vocab), example_positions=[5, 40])  # fmt: skip
    assert stats.tokens == corpus.test.numel() - 1
    assert stats.frequent_mass == pytest.approx(1.0, abs=1e-4)  # every word is "frequent" here
    assert 0 <= stats.unk_mass <= 1 and -1 <= stats.top_cosine <= 1 and 0 <= stats.target_in_top_k <= 1
    assert [e["position"] for e in stats.examples] == [5, 40]
    assert stats.examples[0]["target"] == checkpoint.vocab.itos[int(corpus.test[5])]
    # Perplexity agrees with `tiedlm eval` at batch size 1.
    from tiedlm.evaluate import evaluate

    reference = evaluate(checkpoint.model, corpus.test, 1, 6, "fp32")
    assert stats.perplexity == pytest.approx(reference.perplexity, rel=1e-5)


def test_analyze_predictions_prints_and_reports(trained_run, tmp_path, capsys):
    report = tmp_path / "predictions.md"
    code = main(["analyze", "predictions", str(trained_run), str(trained_run), "--context", "w1 w4", "-k", "3",
                 "--report", str(report), "--examples", "2"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "… w1 w4 ___" in out and "wrote" in out
    text = report.read_text()
    assert "mean probability on `<unk>`" in text and "**… w1 w4 ___**" in text
    assert text.count("(target `") == 2
    # Each checkpoint is named by what it is, not only by its path.
    assert f"- A: `{trained_run}`: config `tiny`" in text and "weights after epoch" in text
    # Where the numbers come from: the commit, the machine, its threads and the study's wall time.
    header = text.splitlines()[2]
    assert re.search(r"\(commit `[0-9a-f?]{1,8}`, .+ \d+ threads?.*, \d+ s; do not edit by hand\)\.$", header), header
    # The same model twice: no claim can hold, since each needs a strict difference.
    assert text.count("does not hold") == 3


def _stats(unk: float, frequent: float, cosine: float) -> PredictionStats:
    return PredictionStats(tokens=10, perplexity=90.0, unk_mass=unk, frequent_mass=frequent,
                           frequent_words=["the"] * 10, top_cosine=cosine, top_k=5, target_in_top_k=0.5,
                           examples=[])  # fmt: skip


def test_prediction_claims_compare_b_with_a_in_both_embeddings():
    # stats[(model, embedding)]: B (1) has less <unk> and frequent mass; its top words are nearer the
    # target in B's embedding (0.43 > 0.42) but not in A's (0.28 < 0.29).
    stats = {(0, 0): _stats(0.05, 0.31, 0.29), (1, 1): _stats(0.04, 0.30, 0.43),
             (1, 0): _stats(0.04, 0.30, 0.28), (0, 1): _stats(0.05, 0.31, 0.42)}  # fmt: skip
    unk, frequent, cosine = prediction_claims(stats)
    assert unk.startswith("- B puts less mass on `<unk>` than A: holds (0.0400 vs 0.0500)")
    assert "most frequent words: holds" in frequent
    assert "holds in B's embedding only" in cosine
    stats[(1, 1)] = _stats(0.06, 0.30, 0.41)
    assert "does not hold" in prediction_claims(stats)[0]
    assert "does not hold in either embedding" in prediction_claims(stats)[2]


def test_analyze_predictions_needs_a_context_or_report(trained_run, capsys):
    assert main(["analyze", "predictions", str(trained_run), str(trained_run)]) == 2
    assert "give --context" in capsys.readouterr().err


def test_nearest_words_by_cosine():
    vocab = Vocabulary(["a", "b", "c", "d"])
    embedding = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 1.0]])
    assert [w for w, _ in nearest_words(embedding, vocab, "a", 3)] == ["b", "d", "c"]
    assert nearest_words(embedding, vocab, "a", 1)[0][1] == pytest.approx(0.9 / math.hypot(0.9, 0.1))


def test_analyze_neighbours(trained_run, capsys):
    assert main(["analyze", "neighbours", str(trained_run), "w3", "-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.split("\t")[0] != "w3" for line in lines)
    assert main(["analyze", "neighbours", str(trained_run), "nosuchword"]) == 2
    assert "'nosuchword' is not in the vocabulary" in capsys.readouterr().err


def test_describe_checkpoint_names_the_decoder():
    from tiedlm.analysis import describe_checkpoint
    from tiedlm.config import Config

    config = Config(name="x")
    state = {"progress": {"epoch": 3, "best_valid_ppl": 101.234}}
    assert describe_checkpoint("ck", config, state) == (
        "`ck`: config `x`, tied, cross-entropy only, weights after epoch 3, best valid perplexity in training 101.23"
    )
    config.model.output_bias = "on"
    assert ", tied with an output bias," in describe_checkpoint("ck", config, state)
    config.model.tie_weights, config.model.output_bias = False, "off"
    assert ", untied without an output bias," in describe_checkpoint("ck", config, state)
