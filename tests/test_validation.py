"""Issue 23: every bad argument, file or disk is one named error, from the API as from the CLI.

Most tests use an untrained model (a LanguageModel built in memory, saved as a checkpoint
folder for the command line): the checks do not depend on what the model has learnt.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import tiedlm
from conftest import write_config, write_corpus
from tiedlm.checkpoint import _seal, load_checkpoint, run_checkpoints
from tiedlm.cli import main
from tiedlm.config import Config, DataConfig, config_from_dict, load_config
from tiedlm.data import EOS, UNK, Vocabulary, load_corpus
from tiedlm.errors import InvalidArgument, InvalidArgumentType, TiedlmError
from tiedlm.generate import score_lines
from tiedlm.models import ARCHITECTURES, build_model, parameter_count

WORDS = [EOS, UNK, *(f"w{i}" for i in range(10))]


def make_lm(architecture: str = "lstm", seed: int = 0) -> tiedlm.LanguageModel:
    own = {"rhn": {"depth": 2}, "transformer": {"num_heads": 2}}.get(architecture, {})
    config = Config(model=ARCHITECTURES[architecture].config_class(hidden_size=8, **own))
    torch.manual_seed(seed)
    return tiedlm.LanguageModel(build_model(config.model, len(WORDS)), Vocabulary(WORDS), config)


@pytest.fixture(scope="module")
def lm():
    return make_lm()


@pytest.fixture(scope="module")
def checkpoint(lm, tmp_path_factory):
    return lm.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiedlm: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0].removeprefix("tiedlm: error: ")


def tree(root) -> dict[str, bytes | None]:
    """Every path under root with its content (None for a folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# --- 1. save_pretrained never destroys anything that is not a checkpoint ------------------------------


def test_save_refuses_a_folder_that_is_not_a_checkpoint(lm, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    before = tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(
            TiedlmError, match=r"mine: is a folder but not a tiedlm checkpoint \(it holds 'notes.txt'\)"
        ):
            lm.save_pretrained(tmp_path / "mine", overwrite=overwrite)
    assert tree(tmp_path) == before


def test_save_refuses_a_file_and_leaves_nothing_behind(lm, tmp_path):
    (tmp_path / "model").write_text("a file")
    before = tree(tmp_path)
    with pytest.raises(TiedlmError, match="model: exists and is not a folder"):
        lm.save_pretrained(tmp_path / "model", overwrite=True)
    assert tree(tmp_path) == before  # no .model.old-PID or .model.tmp-PID


def test_save_refuses_a_run_folder(lm, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(TiedlmError, match="is a training run folder"):
        lm.save_pretrained(tmp_path / "run", overwrite=True)


@pytest.mark.parametrize("where", ["afile/sub", "/proc/no-such-dir/model"])
def test_save_to_an_impossible_path_names_it(lm, tmp_path, where):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / where if not where.startswith("/") else where
    before = tree(tmp_path)
    with pytest.raises(TiedlmError, match=f"{target}: cannot write") as caught:
        lm.save_pretrained(target)
    assert not isinstance(caught.value, OSError)
    assert tree(tmp_path) == before


def test_replacing_a_checkpoint_needs_overwrite(lm, tmp_path):
    saved = lm.save_pretrained(tmp_path / "a" / "b" / "model")  # parents are created
    before = tree(tmp_path)
    with pytest.raises(TiedlmError, match="already holds a checkpoint; pass overwrite=True"):
        make_lm(seed=1).save_pretrained(saved)
    assert tree(tmp_path) == before
    make_lm(seed=1).save_pretrained(saved, overwrite=True)
    assert tree(tmp_path) != before and sorted(p.name for p in tmp_path.rglob(".*")) == []
    again = tiedlm.LanguageModel.from_pretrained(saved)
    assert torch.equal(again.model.embedding.weight, make_lm(seed=1).model.embedding.weight)


def test_save_into_an_empty_folder(lm, tmp_path):
    (tmp_path / "empty").mkdir()
    assert tiedlm.LanguageModel.from_pretrained(lm.save_pretrained(tmp_path / "empty")).vocab == lm.vocab


# --- 2 and 3. generate and score: one check, the same message from the API and the CLI -------------


@pytest.mark.parametrize(
    ("kwargs", "option", "value", "problem"),
    [
        ({"temperature": math.nan}, "--temperature", "nan", "must be a finite number, got nan"),
        ({"temperature": math.inf, "top_k": 3}, "--temperature", "inf", "must be a finite number, got inf"),
        ({"temperature": -1.0}, "--temperature", "-1", "must be ≥ 0, got -1"),
        ({"top_k": -2}, "--top-k", "-2", "must be at least 0, got -2"),
        ({"words": 0}, "--words", "0", "must be at least 1, got 0"),
        ({"seed": 2**64}, "--seed", str(2**64), f"must be at most {2**64 - 1}, got {2**64}"),
        ({"seed": -(2**63) - 1}, "--seed", str(-(2**63) - 1), f"must be at least {-(2**63)}"),
    ],
)
def test_generate_api_and_cli_fail_alike(capsys, lm, checkpoint, kwargs, option, value, problem):
    name = option.removeprefix("--").replace("-", "_")
    with pytest.raises(InvalidArgument) as caught:
        lm.generate("w1", **kwargs)
    assert str(caught.value).startswith(f"{name}: {problem}")
    extra = ["--top-k", "3"] if "top_k" in kwargs and option != "--top-k" else []
    message = one_line_error(*cli(capsys, "generate", checkpoint, "--prompt", "w1", f"{option}={value}", *extra))
    assert message == f"{option}: {caught.value.problem}"


@pytest.mark.parametrize(
    ("kwargs", "kind", "fragment"),
    [
        ({"words": -1}, InvalidArgument, "words: must be at least 1"),
        ({"top_k": 2.5}, InvalidArgumentType, "top_k: must be an integer, got 2.5"),
        ({"top_k": True}, InvalidArgumentType, "top_k: must be an integer"),
        ({"words": "5"}, InvalidArgumentType, "words: must be an integer"),
        ({"temperature": "hot"}, InvalidArgumentType, "temperature: must be a number"),
        ({"temperature": 10**400}, InvalidArgument, "temperature: must be a finite number"),
        ({"seed": 1.5}, InvalidArgumentType, "seed: must be an integer"),
    ],
)
def test_generate_api_names_the_argument(lm, kwargs, kind, fragment):
    with pytest.raises(kind, match=fragment):
        lm.generate("w1", **kwargs)


def test_generate_prompt_of_the_wrong_type(lm):
    with pytest.raises(InvalidArgumentType, match="prompt: must be a string or a list of strings"):
        lm.generate(5)
    with pytest.raises(InvalidArgumentType, match=r"prompt\[1\]: must be a string"):
        lm.generate(["w1", None])


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e30, 1e300])
def test_extreme_temperatures_sample(lm, temperature):
    for top_k in (0, 3):
        out = lm.generate(["w1", "w2 w3"], words=6, temperature=temperature, top_k=top_k, seed=1)
        assert all(len(text.split()) >= 1 for text in out)
    if temperature < 1e-40:  # the limit T → 0 is greedy
        assert lm.generate("w1", words=6, temperature=temperature, seed=3) == lm.generate("w1", words=6, temperature=0)


def test_extreme_temperature_on_the_command_line(capsys, checkpoint):
    for temperature in ("1e-300", "1e300"):
        code, err = cli(capsys, "generate", checkpoint, "--prompt", "w1", "--temperature", temperature, "--top-k", 3)
        assert code == 0, err


def test_score_arguments(lm):
    with pytest.raises(InvalidArgument, match="texts: is empty"):
        lm.score([])
    with pytest.raises(InvalidArgumentType, match=r"texts\[1\]: must be a string"):
        lm.score(["w1", 3])
    with pytest.raises(InvalidArgument, match="batch_size: must be at least 1"):
        lm.score(["w1"], batch_size=0)
    assert lm.score([""]).tokens == 1  # an empty text is just its <eos>


def test_score_batch_size_on_the_command_line(capsys, checkpoint, tmp_path):
    (tmp_path / "t.txt").write_text("w1 w2\n")
    message = one_line_error(*cli(capsys, "score", checkpoint, tmp_path / "t.txt", "--batch-size", 0))
    assert message == "--batch-size: must be at least 1, got 0"


# --- 2. config values that used to fail later, with a traceback ---------------------------------------


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("loss.tau=0", "'loss.tau' must be above 0.0"),
        ("loss.tau=-1", "'loss.tau' must be above 0.0"),
        (f"seed={2**64}", f"'seed' must be at most {2**64 - 1}"),
        (f"data.bptt={2**63}", f"'data.bptt' must be at most {2**63 - 1}"),
    ],
)
def test_out_of_range_config_values(capsys, tmp_path, override, fragment):
    config = write_config(tmp_path / "c.toml", tmp_path / "corpus")
    one_line_error(*cli(capsys, "train", config, "--set", override, "--out", tmp_path / "o"), "--set", fragment)
    assert not (tmp_path / "o").exists()


def test_a_model_too_large_to_allocate(capsys, tmp_path):
    config = write_config(tmp_path / "c.toml", write_corpus(tmp_path / "corpus", words=200))
    message = one_line_error(
        *cli(capsys, "train", config, "--set", f"model.hidden_size={2**40}", "--out", tmp_path / "o")
    )
    assert "model.hidden_size = 1099511627776" in message and "GiB" in message and "memory" in message


def test_parameter_count_matches_the_built_models():
    for architecture in ("lstm", "rhn", "transformer"):
        for tie, bias in ((True, "auto"), (False, "auto"), (True, "on"), (False, "off")):
            own = {"rhn": {"depth": 2}, "transformer": {"num_heads": 2}}.get(architecture, {})
            settings = ARCHITECTURES[architecture].config_class
            config = settings(hidden_size=6, num_layers=3, tie_weights=tie, output_bias=bias, **own)
            built = build_model(config, 11)
            assert parameter_count(config, 11) == sum(p.numel() for p in built.parameters()), (architecture, tie, bias)


# --- 4. errors that name the right thing ----------------------------------------------------------------


def test_a_bad_value_in_the_file_is_blamed_on_the_file(capsys, tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "corpus")
    config.write_text(config.read_text().replace("dropout = 0.3", "dropout = 1.5"))
    message = one_line_error(*cli(capsys, "train", config, "--set", "train.max_epochs=1", "--out", tmp_path / "o"))
    assert message.startswith(f"config {config}: 'model.dropout'") and "--set" not in message
    # and an override that fixes the file's value is taken
    assert load_config(config, ["model.dropout=0.5"]).model.dropout == 0.5


def test_too_few_tokens_names_the_split_and_the_option(capsys, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", words=300)
    config = write_config(tmp_path / "c.toml", corpus)
    message = one_line_error(*cli(capsys, "train", config, "--set", "data.batch_size=400", "--out", tmp_path / "o"))
    assert message.startswith(f"{corpus / 'train.txt'} (train split): ") and "data.batch_size = 400" in message
    message = one_line_error(
        *cli(capsys, "train", config, "--set", "data.eval_batch_size=100", "--out", tmp_path / "p")
    )
    assert "valid.txt (valid split)" in message and "data.eval_batch_size = 100" in message


def test_too_few_tokens_for_eval_names_the_option(capsys, tmp_path, monkeypatch):
    config, run, options = tiny_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "c.toml", "--out", "run", *options]) == 0
    message = one_line_error(*cli(capsys, "eval", run, "--split", "test", "--batch-size", 1000))
    assert message.startswith(f"{tmp_path / 'corpus' / 'test.txt'} (test split): ") and "--batch-size = 1000" in message


def test_a_whitespace_only_train_file_is_empty(capsys, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", words=200)
    (corpus / "train.txt").write_text(" \n\t\n\n")
    with pytest.raises(TiedlmError, match=r"train.txt: has no words \(the file is empty but for whitespace\)"):
        load_corpus(str(corpus))


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_an_incomplete_checkpoint_names_the_missing_file(capsys, lm, tmp_path, missing):
    saved = lm.save_pretrained(tmp_path / "model")
    (saved / missing).unlink()
    one_line_error(*cli(capsys, "eval", saved), f"{missing} missing")
    with pytest.raises(TiedlmError, match=f"{missing} missing"):
        tiedlm.LanguageModel.from_pretrained(saved)


def test_a_run_folder_without_best_is_called_a_run(capsys, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text("{}")
    (tmp_path / "run" / "config.json").write_text("{}")
    message = one_line_error(*cli(capsys, "eval", tmp_path / "run"))
    assert message.startswith(f"run {tmp_path / 'run'}: has no best/ checkpoint") and "not a" not in message


# --- 5. resume after a move -------------------------------------------------------------------------------


def tiny_run(root, name="run", epochs=1):
    config = write_config(root / "c.toml", write_corpus(root / "corpus", words=400))
    config.write_text(config.read_text().replace('corpus = "' + str(root / "corpus"), 'corpus = "corpus'))
    return config, root / name, ["--set", f"train.max_epochs={epochs}", "--set", "train.max_steps_per_epoch=3"]


def test_a_relative_corpus_is_recorded_absolute_and_resumes_from_elsewhere(tmp_path, monkeypatch):
    config, run, options = tiny_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "c.toml", "--out", "run", *options]) == 0
    assert json.loads((run / "config.json").read_text())["data"]["corpus"] == str(tmp_path / "corpus")
    recorded = load_checkpoint(run_checkpoints(run)[-1]).trainer_state["corpus"]
    assert recorded["corpus"] == str(tmp_path / "corpus") and set(recorded["sha256"]) == {
        "train.txt",
        "valid.txt",
        "test.txt",
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(run), "--set", "train.max_epochs=2"]) == 0
    assert [p.name for p in run_checkpoints(run)] == ["epoch-0001", "epoch-0002"]


def test_a_moved_corpus_resumes_when_its_checksums_match(capsys, tmp_path):
    config, run, options = tiny_run(tmp_path)
    config.write_text(config.read_text().replace('corpus = "corpus', f'corpus = "{tmp_path / "corpus"}'))
    assert main(["train", str(config), "--out", str(run), *options]) == 0
    (tmp_path / "corpus").rename(tmp_path / "moved")
    one_line_error(*cli(capsys, "train", "--resume", run), "cannot read the run's corpus", "--set data.corpus=")
    code, err = cli(capsys, "train", "--resume", run, "--set", f"data.corpus={tmp_path / 'moved'}", "--set",
                    "train.max_epochs=2")  # fmt: skip
    assert code == 0, err
    assert f"corpus moved: {tmp_path / 'corpus'} → {tmp_path / 'moved'} (SHA-256 of train, valid and test match)" in err
    assert load_checkpoint(run_checkpoints(run)[-1]).config.data.corpus == str(tmp_path / "moved")
    # a corpus with other contents is refused, naming the file that differs
    other = write_corpus(tmp_path / "other", words=400)
    (other / "test.txt").write_text((other / "test.txt").read_text() + "w1 w2\n")
    before = tree(run)
    message = one_line_error(*cli(capsys, "train", "--resume", run, "--set", f"data.corpus={other}",
                                  "--set", "train.max_epochs=3"))  # fmt: skip
    assert "test.txt" in message and "refusing to resume on other data" in message
    assert tree(run) == before


def test_a_checkpoint_of_the_previous_format_still_resumes(capsys, tmp_path, monkeypatch):
    """Before issue 23 a checkpoint recorded data.corpus as given (relative) and no checksums."""
    config, run, options = tiny_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "c.toml", "--out", "run", *options]) == 0
    for folder in [*run_checkpoints(run), run / "best"]:
        state = json.loads((folder / "trainer_state.json").read_text())
        state.pop("corpus", None)  # best/ shares its files (hard links) with its epoch
        (folder / "trainer_state.json").write_text(json.dumps(state))
        saved = json.loads((folder / "config.json").read_text())
        saved["data"]["corpus"] = "corpus"
        (folder / "config.json").write_text(json.dumps(saved))
        _seal(folder)
    assert main(["train", "--resume", "run", "--set", "train.max_epochs=2"]) == 0  # from its own folder
    assert tiedlm.LanguageModel.from_pretrained(run).vocab == load_corpus("corpus").vocab
    state = load_checkpoint(run_checkpoints(run)[-1]).trainer_state  # the new checkpoint: new format
    assert state["corpus"]["corpus"] == str(tmp_path / "corpus")


# --- 6. score in bounded windows ---------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["lstm", "rhn", "transformer"])
def test_windowed_scores_match_one_pass(architecture):
    lm = make_lm(architecture)
    texts = ["w1 w2 w3 w4 w5 w6 w7", "w2", "", "w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3"]
    whole = score_lines(lm.model, lm.vocab, texts, 4, max_elements=10**9)
    short = [t for t in texts if len(t.split()) < 3]  # a Transformer attends across windows only to its context
    windowed = score_lines(lm.model, lm.vocab, texts if architecture != "transformer" else short, 4,
                           max_elements=3 * len(WORDS))  # fmt: skip
    expected = whole if architecture != "transformer" else [whole[1], whole[2]]
    assert [s.tokens for s in windowed] == [s.tokens for s in expected]
    for a, b in zip(windowed, expected, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_score_memory_does_not_grow_with_line_length(lm, monkeypatch):
    biggest = []
    forward = lm.model.forward

    def recording(tokens, state, **kwargs):
        logits, state = forward(tokens, state, **kwargs)
        biggest.append(logits.numel())
        return logits, state

    monkeypatch.setattr(lm.model, "forward", recording)
    budget = 50 * len(WORDS)
    for words in (10, 1000, 20000):
        biggest.clear()
        result = score_lines(lm.model, lm.vocab, [" ".join(["w1"] * words), "w2"], 32, max_elements=budget)
        assert result[0].tokens == words + 1
        assert max(biggest) <= budget


def test_checkpoint_paths_of_the_wrong_type(tmp_path):
    for bad, kind in ((3, InvalidArgumentType), ("a\0b", InvalidArgument), ("", InvalidArgument)):
        with pytest.raises(kind, match="path"):
            tiedlm.LanguageModel.from_pretrained(bad)
    with pytest.raises(InvalidArgument, match="device: not a device name"):
        tiedlm.LanguageModel.from_pretrained(tmp_path, device="gpu")


def test_config_from_dict_refuses_a_non_table():
    with pytest.raises(TiedlmError, match="expected a table"):
        config_from_dict([1, 2], "somewhere")
    assert config_from_dict({"data": {"corpus": "x"}}, "x").data == DataConfig(corpus="x")


def test_invalid_argument_is_a_value_error():
    assert issubclass(InvalidArgument, ValueError) and issubclass(InvalidArgument, TiedlmError)
    assert issubclass(InvalidArgumentType, TypeError) and issubclass(InvalidArgumentType, InvalidArgument)
