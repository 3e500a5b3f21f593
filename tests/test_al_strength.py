"""scripts/al_strength.py: the augmented loss's gradient beside the cross-entropy's (results/al-strength.md)."""

import importlib.util
import json
from pathlib import Path

import pytest

from tiedlm.testing import write_config, write_corpus

ROOT = Path(__file__).resolve().parent.parent


def script():
    spec = importlib.util.spec_from_file_location("al_strength", ROOT / "scripts" / "al_strength.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_measures_each_temperature_and_writes_the_page(tmp_path):
    config = write_config(tmp_path / "c.toml", write_corpus(tmp_path / "corpus"), tie=False)
    out = tmp_path / "page"
    assert script().main([f"fresh=init:{config}", "--taus", "1,20", "--windows", "2", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    (model,) = result["models"]
    assert model["model"].startswith("fresh: init:") and model["windows"] == 2
    rows = model["taus"]
    assert set(rows) == {"1.0", "20.0"}
    for row in rows.values():
        assert row["ratio"] > 0 and -1 <= row["cosine"] <= 1
    # a hotter softmax is flatter: ỹ and ŷ move towards uniform, and their KL falls
    assert rows["20.0"]["kl"] < rows["1.0"]["kl"]
    page = out.with_suffix(".md").read_text()
    assert "| 20 |" in page
    # untied: W and L start independent, so W lies almost wholly outside span(L) (≈ 1, not 0)
    assert 0.5 < model["distance"] <= 1 and "distance of W from span(L)" in page
    assert model["row_norms"]["W"] > 0 and model["row_norms"]["L"] > 0


def test_a_tied_model_is_at_distance_zero_and_the_command_can_be_pasted(tmp_path):
    config = write_config(tmp_path / "c.toml", write_corpus(tmp_path / "corpus"), tie=True)
    out = tmp_path / "page"
    assert script().main([f"a tied one=init:{config}", "--taus", "20", "--windows", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["models"][0]["distance"] == 0.0
    assert "'a tied one=init:" in result["command"]  # the label's spaces are quoted


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--taus 'x'"):
        script().main(["init:c.toml", "--taus", "x"])
    with pytest.raises(SystemExit, match="no such file"):
        script().main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
