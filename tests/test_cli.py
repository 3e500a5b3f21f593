"""The command line: happy paths and every kind of bad input (one line, exit 2, nothing overwritten)."""

import json
import subprocess
import sys

import pytest

from tiedlm.cli import main


def run_cli(capsys, *args):
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiedlm: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_eval_both_splits_and_batch_size_one(capsys, trained_run):
    results = {}
    for split in ("valid", "test"):
        code, out, _ = run_cli(capsys, "eval", trained_run, "--split", split, "--json")
        assert code == 0
        results[split] = json.loads(out)
    final = json.loads((trained_run / "final.json").read_text())
    assert results["valid"]["perplexity"] == pytest.approx(final["valid_ppl"], rel=1e-6)
    assert results["test"]["perplexity"] == pytest.approx(final["test_ppl"], rel=1e-6)
    code, out, _ = run_cli(capsys, "eval", trained_run, "--split", "test", "--batch-size", 1, "--json")
    one = json.loads(out)
    assert code == 0 and one["batch_size"] == 1 and one["tokens"] > results["test"]["tokens"]
    code, out, _ = run_cli(capsys, "eval", trained_run, "--split", "test", "--precision", "bf16", "--json")
    bf16 = json.loads(out)
    assert code == 0 and bf16["precision"] == "bf16" and results["test"]["precision"] == "fp32"
    assert bf16["perplexity"] == pytest.approx(results["test"]["perplexity"], rel=0.05)


def test_generate_is_reproducible_and_warns_on_unknown_prompt_words(capsys, trained_run):
    args = ("generate", trained_run, "--prompt", "w1 zebra w4", "--words", 20, "--temperature", 0.8, "--seed", 1)
    code, first, err = run_cli(capsys, *args)
    assert code == 0 and "zebra" in err and "<unk>" in err
    _, second, _ = run_cli(capsys, *args)
    assert first == second and first.startswith("w1 zebra w4")
    assert len(first.split()) >= 20  # prompt + 20 words (line breaks stand for <eos>)


def test_score_file_and_stdin_agree(capsys, trained_run, tmp_path, monkeypatch):
    text = "w1 w4 w7\nw2 w5\n\n"
    (tmp_path / "in.txt").write_text(text)
    code, from_file, _ = run_cli(capsys, "score", trained_run, tmp_path / "in.txt")
    assert code == 0
    rows = [line.split("\t") for line in from_file.strip().splitlines()[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "total"]
    assert [int(r[2]) for r in rows] == [4, 3, 1, 8]  # words + <eos>
    assert float(rows[-1][1]) == pytest.approx(sum(float(r[1]) for r in rows[:-1]), abs=1e-3)

    class Stdin:
        buffer = __import__("io").BytesIO(text.encode())

    monkeypatch.setattr(sys, "stdin", Stdin)
    _, from_stdin, _ = run_cli(capsys, "score", trained_run, "-")
    assert from_stdin == from_file


def test_score_matches_batch_of_one(capsys, trained_run, tmp_path):
    lines = ["w1 w4 w7 w10 w13", "w2", "w3 w6 w9"]
    (tmp_path / "all.txt").write_text("\n".join(lines) + "\n")
    _, together, _ = run_cli(capsys, "score", trained_run, tmp_path / "all.txt", "--batch-size", 3)
    _, alone, _ = run_cli(capsys, "score", trained_run, tmp_path / "all.txt", "--batch-size", 1)
    assert together == alone


# --- bad input -------------------------------------------------------------------------------------------


def test_missing_config(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "train", tmp_path / "nope.toml")[::2], "nope.toml", "no such file")


def test_unknown_config_key_suggests_the_right_one(capsys, tmp_path, config_file):
    bad = tmp_path / "bad.toml"
    bad.write_text(config_file.read_text().replace("hidden_size", "hiden_size"))
    code, _, err = run_cli(capsys, "train", bad, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "bad.toml", "model.hiden_size", "hidden_size")
    assert not (tmp_path / "out").exists()


def test_mistyped_config_value(capsys, tmp_path, config_file):
    bad = tmp_path / "bad.toml"
    bad.write_text(config_file.read_text().replace("hidden_size = 12", 'hidden_size = "twelve"'))
    assert_one_line_error(*run_cli(capsys, "train", bad)[::2], "bad.toml", "model.hidden_size", "integer")


def test_invalid_toml(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nhidden_size = 3")
    assert_one_line_error(*run_cli(capsys, "train", bad)[::2], "bad.toml", "invalid TOML")


def test_non_utf8_config(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"name = '\xff'")
    assert_one_line_error(*run_cli(capsys, "train", bad)[::2], "bad.toml", "UTF-8")


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.lr", ["train.lr", "KEY=VALUE"]),
        ("train.lr=fast", ["train.lr", "number"]),
        ("train.lrr=1", ["train.lrr", "did you mean 'lr'"]),
        ("model.dropout=1.5", ["model.dropout", "below 1.0"]),
        ("model.dropout_mode=quick", ["model.dropout_mode", "exact, fast"]),
        ("nosection.key=1", ["nosection.key"]),
    ],
)
def test_bad_set(capsys, tmp_path, config_file, override, fragments):
    code, _, err = run_cli(capsys, "train", config_file, "--set", override, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "--set", *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("content", "fragment"), [(b"", "file is empty"), (b"a\xff b\n", "not valid UTF-8")])
def test_bad_data_file(capsys, tmp_path, corpus_dir, config_file, content, fragment):
    (corpus_dir / "valid.txt").write_bytes(content)
    assert_one_line_error(*run_cli(capsys, "train", config_file, "--out", tmp_path / "o")[::2], "valid.txt", fragment)


def test_missing_data_file(capsys, tmp_path, corpus_dir, config_file):
    (corpus_dir / "test.txt").unlink()
    assert_one_line_error(*run_cli(capsys, "train", config_file, "--out", tmp_path / "o")[::2], "test.txt", "no such")


def test_missing_checkpoint(capsys, tmp_path):
    for command in (["eval"], ["generate"], ["score"]):
        extra = ["-"] if command == ["score"] else []
        code, _, err = run_cli(capsys, *command, tmp_path / "nothing", *extra)
        assert_one_line_error(code, err, "nothing", "no such")


def test_not_a_checkpoint_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "empty")[::2], "not a checkpoint folder")


def test_corrupt_weights(capsys, trained_run_copy):
    (trained_run_copy / "best" / "model.safetensors").unlink()
    (trained_run_copy / "best" / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(
        *run_cli(capsys, "eval", trained_run_copy / "best")[::2], "model.safetensors", "does not match the manifest"
    )


def test_checkpoint_vocabulary_must_match_data(capsys, tmp_path, trained_run):
    from conftest import write_corpus

    other = write_corpus(tmp_path / "other", vocab=40)
    code, _, err = run_cli(capsys, "eval", trained_run, "--data", other)
    assert_one_line_error(code, err, "other", "vocabulary", "does not match")


def test_resume_with_changed_model_is_refused(capsys, trained_config, trained_run_copy):
    run = trained_run_copy
    before = (run / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, "train", trained_config, "--resume", run, "--set", "model.hidden_size=16")
    assert_one_line_error(code, err, "model.hidden_size")
    assert (run / "metrics.jsonl").read_text() == before


def test_existing_run_is_not_overwritten(capsys, config_file, trained_run_copy):
    run = trained_run_copy
    before = (run / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, "train", config_file, "--out", run)
    assert_one_line_error(code, err, str(run), "already holds a run", "--resume")
    assert (run / "metrics.jsonl").read_text() == before


def test_score_bad_input(capsys, tmp_path, trained_run):
    (tmp_path / "bad.txt").write_bytes(b"w1 \xff\n")
    assert_one_line_error(*run_cli(capsys, "score", trained_run, tmp_path / "bad.txt")[::2], "bad.txt", "UTF-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    assert_one_line_error(*run_cli(capsys, "score", trained_run, tmp_path / "empty.txt")[::2], "no lines")


def test_bad_arguments_are_one_line(capsys, trained_run):
    assert_one_line_error(*run_cli(capsys, "generate", trained_run, "--words", "0")[::2], "--words")
    assert_one_line_error(*run_cli(capsys, "generate", trained_run, "--temperature", "-1")[::2], "--temperature")
    assert_one_line_error(*run_cli(capsys, "eval", trained_run, "--split", "train")[::2], "--split")
    assert_one_line_error(*run_cli(capsys, "bogus")[::2], "bogus")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tiedlm", "eval", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
