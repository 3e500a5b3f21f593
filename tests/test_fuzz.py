"""Property-based tests: whatever a user feeds in, the outcome is success or the one-line
error with exit code 2 — never a traceback, never a hang (hypothesis deadlines)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiedlm import training as training_package
from tiedlm.cli import main
from tiedlm.config import Config, DataConfig, LossConfig, ModelConfig, PaperConfig, TrainConfig, load_config
from tiedlm.data import load_corpus
from tiedlm.errors import TiedlmError

FUZZ = settings(max_examples=120, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])


def run_main(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def assert_clean_outcome(code: int, err: str) -> None:
    if code == 0:
        return
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("tiedlm: error: "), err
    assert sum(line.startswith("tiedlm: error: ") for line in lines) == 1
    assert "Traceback" not in err


# --- the corpus reader -------------------------------------------------------------------------------------

words = st.sampled_from(["a", "b", "<unk>", "<eos>", "ünï", "\x00", "x" * 300, "日本"])
line = st.lists(words, max_size=40).map(" ".join)
separators = st.sampled_from(["\n", "\r\n", "\n\n", "\r", " \n"])
text_file = st.builds(lambda ls, sep: sep.join(ls), st.lists(line, max_size=30), separators).map(
    lambda s: s.encode("utf-8")
)
invalid = st.builds(lambda data, cut: data[:cut] + b"\xff\xfe" + data[cut:], text_file, st.integers(0, 50))
split_bytes = st.one_of(st.binary(max_size=300), text_file, invalid, st.just(b""), st.just(b"w " * 5000 + b"\n"))


@FUZZ
@given(train=split_bytes, valid=split_bytes, test=split_bytes)
def test_corpus_reader(train, valid, test):
    with tempfile.TemporaryDirectory() as root:
        for name, data in (("train", train), ("valid", valid), ("test", test)):
            Path(root, f"{name}.txt").write_bytes(data)
        try:
            corpus = load_corpus(root)
        except TiedlmError as exc:
            assert "\n" not in str(exc) and root in str(exc)
            return
        assert corpus.train.numel() >= 1 and len(corpus.vocab) >= 1


# --- the TOML config loader and --set ----------------------------------------------------------------------

SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig, "paper": PaperConfig}
known_keys = [f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.__dataclass_fields__] + ["name", "seed"]
scalar = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=20)
)
value = st.one_of(scalar, st.lists(scalar, max_size=3))
key = st.one_of(st.sampled_from(known_keys), st.text(min_size=1, max_size=12))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


def render(entries: list[tuple[str, object]]) -> str:
    lines = []
    for dotted, v in entries:
        parts = dotted.split(".", 1)
        if len(parts) == 2:
            lines.append(f"[{json.dumps(parts[0])}]")
        lines.append(f"{json.dumps(parts[-1])} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


toml_text = st.one_of(
    st.lists(st.tuples(key, value), max_size=8).map(render),
    st.text(max_size=200),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
)


@FUZZ
@given(text=toml_text, raw=st.booleans())
def test_config_loader(text, raw):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root, "c.toml")
        path.write_bytes(text.encode("latin-1" if raw and all(ord(c) < 256 for c in text) else "utf-8", "replace"))
        try:
            config = load_config(path)
        except TiedlmError as exc:
            assert "\n" not in str(exc) and "c.toml" in str(exc)
            return
        assert isinstance(config, Config)


class _NoTraining:
    """Stands in for the trainer: the --set fuzz is about parsing, not about training."""

    def __init__(self, config, run_dir, **kwargs):
        assert isinstance(config, Config)

    def fit(self):
        return {"best_epoch": 0, "valid_ppl": 1.0, "test_ppl": 1.0}


override = st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(known_keys), st.text(max_size=15)),
    st.builds(lambda k, v: f"{k}={toml_value(v)}", st.sampled_from(known_keys), value),
)


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "base.toml"
    path.write_text('name = "base"\n[train]\ndevice = "cpu"\n')
    return path


@FUZZ
@given(overrides=st.lists(override, min_size=1, max_size=3))
def test_set_parsing(base_config, overrides):
    args = ["train", base_config, "--out", tempfile.mkdtemp()]
    for text in overrides:
        args += ["--set", text]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training_package, "Trainer", _NoTraining)
        code, _, err = run_main(*args)
    assert_clean_outcome(code, err)


# --- tiedlm score ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import write_config, write_corpus

    root = tmp_path_factory.mktemp("score")
    config = write_config(root / "c.toml", write_corpus(root / "corpus", words=300))
    code, _, err = run_main("train", config, "--out", root / "run", "--set", "train.max_epochs=1")
    assert code == 0, err
    return root / "run"


@settings(max_examples=80, deadline=20_000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(split_bytes, st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_score_input(checkpoint, data):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root, "input.txt")
        path.write_bytes(data)
        code, out, err = run_main("score", checkpoint, path, "--batch-size", 4)
    assert_clean_outcome(code, err)
    if code == 0:
        assert out.splitlines()[-1].startswith("total\t")
