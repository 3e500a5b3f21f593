"""Property-based tests of the Python API (tests/test_fuzz.py fuzzes the command line).

Each test draws every argument from its own type and from every other type (non-finite
floats, integers beyond int64, bools, bytes, None, lists, objects) and checks the outcome
against the documented rules: a call whose arguments are all valid succeeds and returns what
it says; any other call raises the documented error (an InvalidArgument naming the argument,
or a TiedlmError naming the file), never anything else; and nothing outside the target
folder changes.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiedlm
from tiedlm.config import Config, ModelConfig, config_from_dict, load_config
from tiedlm.data import EOS, UNK, Vocabulary
from tiedlm.errors import InvalidArgument, TiedlmError
from tiedlm.models import build_model
from tiedlm.validate import SEED_MAX, SEED_MIN

API = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORDS = [EOS, UNK, *(f"w{i}" for i in range(10))]


@pytest.fixture(scope="module")
def lm():
    config = Config(model=ModelConfig(hidden_size=8))
    torch.manual_seed(0)
    return tiedlm.LanguageModel(build_model(config.model, len(WORDS)), Vocabulary(WORDS), config)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


# Values of every type an argument could be given.
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.builds(object),
    st.just(Path("w1")),
    st.just(10**400),  # beyond the float range
)
not_an_int = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.builds(object)
)
word = st.sampled_from([*WORDS[2:], UNK, EOS, "zebra", "日本", ""])
text = st.lists(word, max_size=8).map(" ".join)
texts = st.one_of(text, st.lists(text, max_size=4), st.tuples(text, text), anything)


def raises_named(call, name: str) -> None:
    """``call()`` raises an InvalidArgument whose name begins with ``name``."""
    with pytest.raises(InvalidArgument) as caught:
        call()
    assert caught.value.name.startswith(name), (caught.value.name, name)
    assert "\n" not in str(caught.value)


def is_text_list(value) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value))


# --- generate --------------------------------------------------------------------------------------------

# Valid but long word counts are left out: they would only take long. Beyond int64 is refused.
words_arg = st.one_of(st.integers(-5, 12), st.integers(2**63, 2**70), not_an_int)
temperature_arg = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 10**400), anything)
top_k_arg = st.one_of(st.integers(-3, 20), st.integers(2**63, 2**70), st.floats(0, 5), anything)
seed_arg = st.one_of(
    st.none(), st.integers(SEED_MIN - 5, SEED_MIN + 5), st.integers(SEED_MAX - 5, SEED_MAX + 5), anything
)


def first_invalid_generate(prompt, words, temperature, top_k, seed) -> str | None:
    """The argument the documented rules refuse first, or None if all are valid (LanguageModel.generate)."""
    if not is_text_list(prompt):
        return "prompt"
    if not (is_int(words) and 1 <= words < 2**63):
        return "words"
    if not (is_finite_real(temperature) and temperature >= 0):
        return "temperature"
    if not (is_int(top_k) and top_k >= 0):
        return "top_k"
    if seed is not None and not (is_int(seed) and SEED_MIN <= seed <= SEED_MAX):
        return "seed"
    return None


@API
@given(prompt=texts, words=words_arg, temperature=temperature_arg, top_k=top_k_arg, seed=seed_arg)
def test_generate(lm, prompt, words, temperature, top_k, seed):
    call = lambda: lm.generate(prompt, words=words, temperature=temperature, top_k=top_k, seed=seed)  # noqa: E731
    culprit = first_invalid_generate(prompt, words, temperature, top_k, seed)
    if culprit is not None:
        raises_named(call, culprit)
        return
    out = call()
    prompts, outs = ([prompt], [out]) if isinstance(prompt, str) else (list(prompt), out)
    assert isinstance(out, str if isinstance(prompt, str) else list) and len(outs) == len(prompts)
    for one, text in zip(prompts, outs, strict=True):  # the prompt, then the words (<eos> as a line break)
        read = [w for w in one.split() if w != EOS]
        assert isinstance(text, str) and text.split()[: len(read)] == read
    if seed is not None:  # repeatable
        assert call() == out


# --- score -----------------------------------------------------------------------------------------------

batch_arg = st.one_of(st.integers(-3, 40), st.integers(2**63, 2**70), not_an_int)


@API
@given(given_texts=texts, batch_size=batch_arg)
def test_score(lm, given_texts, batch_size):
    call = lambda: lm.score(given_texts, batch_size=batch_size)  # noqa: E731
    if not is_text_list(given_texts) or (not isinstance(given_texts, str) and not given_texts):
        raises_named(call, "texts")
        return
    if not (is_int(batch_size) and batch_size >= 1):
        raises_named(call, "batch_size")
        return
    scores = call()
    items = [given_texts] if isinstance(given_texts, str) else list(given_texts)
    assert [line.tokens for line in scores.lines] == [len(t.split()) + 1 for t in items]
    assert all(math.isfinite(line.logprob) and line.logprob <= 0 for line in scores.lines)
    assert scores.tokens == sum(line.tokens for line in scores.lines) and math.isfinite(scores.perplexity)


# --- save_pretrained / from_pretrained: nothing but the target changes -----------------------------------


def snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root`` (links not followed) with its content, or its kind for folders and links."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            key = str(path.relative_to(root))
            found[key] = (
                ("link", os.readlink(path)) if path.is_symlink() else "dir" if path.is_dir() else path.read_bytes()
            )
    return found


def sandbox(root: Path, lm) -> Path:
    (root / "file").write_text("user data")
    (root / "userdir").mkdir()
    (root / "userdir" / "notes.txt").write_text("user notes")
    (root / "empty").mkdir()
    (root / "link").symlink_to(root / "userdir")
    lm.save_pretrained(root / "ckpt")
    (root / "run" / "checkpoints").mkdir(parents=True)
    (root / "run" / "run.json").write_text("{}")
    return root


TARGETS = ["new", "new/a/b", "file", "file/sub", "userdir", "empty", "link", "ckpt", "run", "/proc/no/such"]
# Saving succeeds exactly here (the checkpoint only with overwrite=True).
WRITABLE = {"new", "new/a/b", "empty"}


def outside(found: dict[str, object], target: str) -> dict[str, object]:
    top = target.split("/")[0]
    return {k: v for k, v in found.items() if k != top and not k.startswith(top + "/")}


def resolve(root: Path, target: str, as_path: bool) -> Path | str:
    path = Path(target) if target.startswith("/") else root / target
    return path if as_path else str(path)


@API
@given(target=st.sampled_from(TARGETS), as_path=st.booleans(), overwrite=st.one_of(st.booleans(), anything))
def test_save_pretrained(lm, target, as_path, overwrite):
    with tempfile.TemporaryDirectory() as folder:
        root = sandbox(Path(folder), lm)
        before = snapshot(root)
        path = resolve(root, target, as_path)
        call = lambda: lm.save_pretrained(path, overwrite=overwrite)  # noqa: E731
        if not isinstance(overwrite, bool):
            raises_named(call, "overwrite")
            assert snapshot(root) == before
        elif target in WRITABLE or (target == "ckpt" and overwrite):
            assert Path(call()) == Path(path)
            assert tiedlm.LanguageModel.from_pretrained(path).vocab == lm.vocab
            assert outside(snapshot(root), target) == outside(before, target)
        else:
            with pytest.raises(TiedlmError) as caught:
                call()
            assert not isinstance(caught.value, OSError) and str(path) in str(caught.value)
            assert "\n" not in str(caught.value)
            assert snapshot(root) == before  # the target included
        assert not [p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


# Paths of the wrong type, or strings no file system takes; a real relative path is left out (it
# would be written in the working directory).
bad_path = anything.filter(lambda v: not isinstance(v, (str, os.PathLike)) or not str(v) or "\0" in str(v))


@API
@given(path=st.one_of(bad_path, st.sampled_from(["", "\0", "a\0b"])), overwrite=st.one_of(st.booleans(), anything))
def test_save_pretrained_to_a_bad_path(lm, path, overwrite):
    raises_named(lambda: lm.save_pretrained(path, overwrite=overwrite), "path")


devices = st.one_of(st.sampled_from(["cpu", "cpu:0", "cuda", "cuda:7", "gpu", "meta", "", "cpu\0"]), anything)


@API
@given(target=st.sampled_from(TARGETS), as_path=st.booleans(), device=devices)
def test_from_pretrained(lm, target, as_path, device):
    with tempfile.TemporaryDirectory() as folder:
        root = sandbox(Path(folder), lm)
        before = snapshot(root)
        call = lambda: tiedlm.LanguageModel.from_pretrained(resolve(root, target, as_path), device=device)  # noqa: E731
        usable = device in ("cpu", "cpu:0") or (device == "cuda" and torch.cuda.is_available())
        if target == "ckpt" and usable:
            assert call().vocab == lm.vocab
        elif target == "ckpt":
            raises_named(call, "device")
        else:
            with pytest.raises(TiedlmError) as caught:
                call()
            assert "\n" not in str(caught.value)
        assert snapshot(root) == before


@API
@given(path=st.one_of(bad_path, st.sampled_from(["", "a\0b"])), device=devices)
def test_from_pretrained_bad_path(path, device):
    raises_named(lambda: tiedlm.LanguageModel.from_pretrained(path, device=device), "path")


# --- config loading ----------------------------------------------------------------------------------------

SECTION_KEYS = {
    "data": ["corpus", "batch_size", "bptt", "eval_batch_size"],
    "model": ["architecture", "hidden_size", "num_layers", "dropout", "tie_weights", "output_bias", "context_size"],
    "loss": ["augmented", "tau", "gamma", "detach_target"],
    "train": ["lr", "lr_decay", "max_epochs", "clip", "optimizer", "time_limit_minutes", "device"],
    "paper": ["valid", "test", "source"],
}
section = st.sampled_from(sorted(SECTION_KEYS)).flatmap(
    lambda name: st.tuples(
        st.just(name),
        st.dictionaries(st.sampled_from([*SECTION_KEYS[name], "bogus"]), anything, max_size=4) | anything,
    )
)
raw_config = st.one_of(
    st.dictionaries(st.sampled_from(["name", "seed", "extra"]), anything, max_size=2).flatmap(
        lambda top: st.lists(section, max_size=3).map(lambda sections: {**top, **dict(sections)})
    ),
    anything,
)


def assert_within_bounds(config: Config) -> None:
    """What the config check promises of a Config it returns."""
    assert SEED_MIN <= config.seed <= SEED_MAX
    assert config.loss.tau > 0 and config.loss.gamma >= 0
    for part in (config.data, config.model, config.loss, config.train):
        for value in part.__dict__.values():
            if is_int(value):
                assert -(2**63) <= value < 2**63
            elif isinstance(value, float):
                assert math.isfinite(value)


@API
@given(raw=raw_config)
def test_config_from_dict(raw):
    try:
        config = config_from_dict(raw, "fuzz")
    except TiedlmError as exc:
        assert str(exc).startswith("fuzz: ") and "\n" not in str(exc)
        return
    assert isinstance(config, Config)
    assert_within_bounds(config)


@API
@given(
    overrides=st.one_of(
        st.lists(
            st.builds(
                lambda k, v: f"{k}={v}",
                st.sampled_from(["seed", "loss.tau", "model.hidden_size", "data.bptt", "train.lr", "nope.x"]),
                st.one_of(st.integers(-(2**70), 2**70).map(str), st.sampled_from(["nan", "inf", "0", "-1", "x"])),
            ),
            max_size=3,
        ),
        anything,
    ),
    path=st.one_of(st.just("good"), anything),
)
def test_load_config(overrides, path):
    with tempfile.TemporaryDirectory() as folder:
        good = Path(folder, "c.toml")
        good.write_text('name = "fuzz"\n[loss]\ntau = 2.0\n')
        try:
            config = load_config(good if path == "good" else path, overrides)
        except TiedlmError as exc:
            assert "\n" not in str(exc).replace(str(path), "")  # one line, but for the file's own name
            return
        assert path == "good" and isinstance(config, Config)
        assert_within_bounds(config)
