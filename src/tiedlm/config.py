"""Experiment configuration: dataclasses loaded from TOML, overridable with ``--set``.

A config file has optional top-level ``name`` and ``seed`` and the sections
``[data]``, ``[model]``, ``[loss]``, ``[train]`` and ``[paper]`` (the paper's
target perplexities, kept as data). Every key is checked: an unknown key, a
value of the wrong type or out of range is a one-line :class:`TiedlmError`
naming the file (or ``--set``) and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tiedlm import validate
from tiedlm.errors import TiedlmError
from tiedlm.validate import INT64_MAX, SEED_MAX, SEED_MIN

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def choice(*values: str) -> dict:
    return {"choices": values}


def value_range(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> dict:
    """A field's bounds, checked when a config is read (``metadata=value_range(1)``: at least 1)."""
    return {"low": low, "high": high, "low_open": low_open, "high_open": high_open}


@dataclass
class DataConfig:
    corpus: str = "ptb"  # a bundled corpus ("ptb", "wikitext-2") or a directory with train/valid/test.txt
    batch_size: int = field(default=20, metadata=value_range(1))
    bptt: int = field(default=35, metadata=value_range(1))
    eval_batch_size: int = field(default=10, metadata=value_range(1))


@dataclass
class ModelConfig:
    """The settings every architecture shares (the LSTM's are exactly these).

    Each architecture registers its own subclass with the fields only it reads
    (``RHNConfig`` in tiedlm/models/rhn.py, ``TransformerConfig`` in tiedlm/models/transformer.py);
    a file's ``[model]`` table stays flat, and ``architecture`` picks the class that reads it.
    ``unused`` names the shared fields a subclass does not read: a file may set them only to
    their defaults, which every saved config.json carries (the flat table is written whole).
    """

    unused: ClassVar[tuple[str, ...]] = ()

    architecture: str = "lstm"  # one of tiedlm.models.ARCHITECTURES, checked when a config is read
    hidden_size: int = field(default=200, metadata=value_range(1))  # = embedding size (docs/method.md §2)
    num_layers: int = field(default=2, metadata=value_range(1))
    dropout: float = field(default=0.3, metadata=value_range(0.0, 1.0, high_open=True))  # drop probability
    dropout_mode: str = field(default="exact", metadata=choice("exact", "fast"))
    tie_weights: bool = True
    # The decoder's bias: "auto" = a bias only when untied (the paper's pairing, docs/method.md §2);
    # "on" / "off" force it either way (an ablation of what the missing bias costs a tied model).
    output_bias: str = field(default="auto", metadata=choice("auto", "on", "off"))
    init_range: float = field(default=0.1, metadata=value_range(0.0))

    def has_output_bias(self) -> bool:
        """Whether the decoder has a bias: ``output_bias``, where "auto" means only when untied."""
        return not self.tie_weights if self.output_bias == "auto" else self.output_bias == "on"


@dataclass
class LossConfig:
    augmented: bool = False
    tau: float = field(default=20.0, metadata=value_range(0.0, low_open=True))  # the KL divides by τ
    gamma: float = field(default=0.5, metadata=value_range(0.0))
    detach_target: bool = False  # results/ablations.md: a trainable target did better


@dataclass
class TrainConfig:
    lr: float = field(default=1.0, metadata=value_range(0.0))
    lr_decay: float = field(default=0.9, metadata=value_range(0.0, 1.0))
    lr_decay_start: int = field(default=5, metadata=value_range(1))  # first epoch whose lr is decayed
    clip: float = field(default=5.0, metadata=value_range(0.0))  # global gradient norm; 0 = no clipping
    optimizer: str = field(default="sgd", metadata=choice("sgd", "adamw"))
    weight_decay: float = field(default=0.0, metadata=value_range(0.0))  # SGD: L2 penalty; AdamW: decoupled decay
    max_epochs: int = field(default=40, metadata=value_range(1))
    patience: int = field(default=5, metadata=value_range(1))  # epochs without a better validation ppl
    max_steps_per_epoch: int = field(default=0, metadata=value_range(0))  # 0 = the whole training split
    # Stop before an epoch that would end past this many minutes of training (0 = no limit).
    time_limit_minutes: float = field(default=0.0, metadata=value_range(0.0))
    nonfinite_patience: int = field(default=5, metadata=value_range(1))  # consecutive NaN/inf steps before a rollback
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    # bf16 = autocast matmuls; auto = bf16 only where it is native (tiedlm/precision.py)
    precision: str = field(default="fp32", metadata=choice("fp32", "bf16", "auto"))
    # torch.compile what wins on a CPU (benchmarks/COMPILE.md): the augmented loss's fused (tokens x |V|) work
    compile: bool = False
    compile_model: bool = False  # also torch.compile the model's forward (slower on PTB small on a CPU)
    # Replay each training window from a CUDA graph (tiedlm/cuda_graph.py): "auto" = on a CUDA device for
    # an exact-mask LSTM in one process, else eager; "on" = required (an error where it cannot); "off" = eager.
    cuda_graph: str = field(default="auto", metadata=choice("auto", "on", "off"))
    tensorboard: bool = True  # also log every epoch to RUN/tensorboard/ when `tensorboard` is installed
    # Start from the weights of another run's best/ (or of a checkpoint folder); optimizer, schedule,
    # epochs and early stopping start afresh: the paper's second training stage for PTB small.
    init_from: str = ""


@dataclass
class PaperConfig:
    """The published perplexities this configuration is meant to reproduce."""

    valid: float | None = None
    test: float | None = None
    source: str = ""
    # How many training stages the paper's number took: stage k > 1 starts from stage k-1's best
    # weights with a fresh schedule (train.init_from). `tiedlm reproduce` follows it; `tiedlm train`
    # trains one stage. The paper's footnote 4: 2 for its small PTB models (docs/method.md).
    stages: int = field(default=1, metadata=value_range(1))


@dataclass
class Config:
    name: str = "run"
    seed: int = field(default=1, metadata=value_range(SEED_MIN, SEED_MAX))  # what torch.manual_seed accepts
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as TOML/JSON tables; ``model`` is the flat table every config.json has held."""
        return dataclasses.asdict(self) | {"model": model_table(self.model)}


# model.architecture → its settings class, in registration order. tiedlm.models.register fills it
# (so that this module never imports the models, which import it); importing any part of tiedlm
# imports tiedlm.models first (tiedlm/__init__.py), so it is full before a config is read.
MODEL_SETTINGS: dict[str, type[ModelConfig]] = {}


def settings(config_class: type[ModelConfig]) -> list[str]:
    """The keys of the ``[model]`` table an architecture with these settings reads."""
    return [f.name for f in dataclasses.fields(config_class) if f.name not in config_class.unused]


def table_fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every key the flat ``[model]`` table can hold, in file order, with the field (checks and
    default) and type of its first owner: the shared settings, then each architecture's own."""
    fields: dict[str, tuple[dataclasses.Field, Any]] = {}
    for cls in MODEL_SETTINGS.values():
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            fields.setdefault(spec.name, (spec, hints[spec.name]))
    return fields


def field_default(spec: dataclasses.Field) -> Any:
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def _model_fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every key of the flat ``[model]`` table: (field, type) of the architecture that has it."""
    return table_fields()


def _architecture_choice() -> dict:
    return choice(*MODEL_SETTINGS)


def model_table(model: ModelConfig) -> dict[str, Any]:
    """The flat ``[model]`` table of ``model``: every architecture's keys, in file order, the ones
    ``model`` does not have at their defaults (so a config.json reads the same at any commit)."""
    own = {f.name for f in dataclasses.fields(model)}
    return {
        name: getattr(model, name) if name in own else field_default(spec)
        for name, (spec, _) in _model_fields().items()
    }


def _model_from_dict(raw: dict[str, Any], where: str) -> ModelConfig:
    """The ``[model]`` table as the settings class of its ``architecture`` (MODEL_SETTINGS).

    Another architecture's key is taken only at its default (and then dropped): a saved
    config.json holds the whole flat table.
    """
    architecture = _coerce(where, "model.architecture", raw.get("architecture", "lstm"), str, _architecture_choice())
    cls = MODEL_SETTINGS[architecture]
    own = settings(cls)
    every = _model_fields()
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        name = f"model.{key}"
        if key in own:
            spec = next(f for f in dataclasses.fields(cls) if f.name == key)
            values[key] = _coerce(where, name, value, hints[key], spec.metadata)
        elif key in every:
            spec, kind = every[key]
            if _coerce(where, name, value, kind, spec.metadata) != field_default(spec):
                owners = [a for a, owner in MODEL_SETTINGS.items() if key in settings(owner)]
                raise TiedlmError(
                    f"{where}: unknown key {name!r} for model.architecture {architecture!r} "
                    f"(a key of {', '.join(owners)})"
                )
        else:
            raise _unknown(where, name, own)
    return cls(**values)


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in ("data", "model", "loss", "train", "paper")}


def _unknown(where: str, key: str, known: list[str]) -> TiedlmError:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
    return TiedlmError(f"{where}: unknown key {key!r}{hint}")


def _coerce(where: str, key: str, value: Any, kind: Any, meta: typing.Mapping) -> Any:
    """Check ``value`` against the field's type and metadata; return it in that type."""
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
    if optional:
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an integer beyond the float range
            ok = False
        ok = ok and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise TiedlmError(f"{where}: '{key}' must be {names[kind]}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise TiedlmError(f"{where}: '{key}' must be one of {', '.join(meta['choices'])}; got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    if kind is int and high is None:  # what torch (int64) can take
        low, high = (-INT64_MAX - 1 if low is None else low), INT64_MAX
    if low is not None and (value <= low if meta.get("low_open") else value < low):
        bound = "above" if meta.get("low_open") else "at least"
        raise TiedlmError(f"{where}: '{key}' must be {bound} {low}, got {value!r}")
    if high is not None and (value >= high if meta.get("high_open") else value > high):
        bound = "below" if meta.get("high_open") else "at most"
        raise TiedlmError(f"{where}: '{key}' must be {bound} {high}, got {value!r}")
    return value


def config_from_dict(raw: dict[str, Any], where: str) -> Config:
    """Build a checked :class:`Config` from parsed TOML/JSON; ``where`` names the source in errors."""
    if not isinstance(raw, dict):
        raise TiedlmError(f"{where}: expected a table of settings, got {type(raw).__name__}")
    sections = _section_classes()
    top_fields = {f.name: f for f in dataclasses.fields(Config) if f.name not in sections}
    known = list(top_fields) + list(sections)
    kwargs: dict[str, Any] = {}
    top_hints = typing.get_type_hints(Config)
    for key, value in raw.items():
        if key in sections:
            if not isinstance(value, dict):
                raise TiedlmError(f"{where}: '{key}' must be a table ([{key}])")
            read = _model_from_dict if key == "model" else functools.partial(_section_from_dict, sections[key], key)
            kwargs[key] = read(value, where)
        elif key in top_fields:
            kwargs[key] = _coerce(where, key, value, top_hints[key], top_fields[key].metadata)
        else:
            raise _unknown(where, key, known)
    return Config(**kwargs)


def _section_from_dict(cls: type, section: str, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(where, f"{section}.{key}", list(fields))
        values[key] = _coerce(where, f"{section}.{key}", value, hints[key], fields[key].metadata)
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``section.key=value`` into its key path and raw value text."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise TiedlmError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=0.5")
    return key.split("."), value.strip()


def _parse_value(text: str, kind: Any) -> Any:
    """Read ``--set`` text as TOML; a bare word for a string field is taken as it is."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if kind is str or text.lower() == "none":
            return None if text.lower() == "none" else text
        return text  # _coerce reports the type error with the option's name


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``--set section.key=value`` applied.

    Each value is checked here, on its own, so that an error names the ``--set`` at fault;
    an error in the merged config is then the file's (see :func:`load_config`).
    """
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    sections = _section_classes()
    top = typing.get_type_hints(Config)
    top_fields = {f.name: f for f in dataclasses.fields(Config)}
    for text in overrides:
        if not isinstance(text, str):
            raise TiedlmError(f"--set {text!r}: expected a KEY=VALUE string")
        path, value_text = parse_override(text)
        where = f"--set {text!r}"
        if len(path) == 1 and path[0] in top and path[0] not in sections:
            kind, meta = top[path[0]], top_fields[path[0]].metadata
            merged[path[0]] = _coerce(where, path[0], _parse_value(value_text, kind), kind, meta)
        elif len(path) == 2 and path[0] in sections:
            # [model] keys of every architecture; whether the config's reads this one is the file's check
            if path[0] == "model":
                known = _model_fields()
            else:
                hints = typing.get_type_hints(sections[path[0]])
                known = {f.name: (f, hints[f.name]) for f in dataclasses.fields(sections[path[0]])}
            if path[1] not in known:
                raise _unknown(where, ".".join(path), list(known))
            spec, kind = known[path[1]]
            meta = _architecture_choice() if path == ["model", "architecture"] else spec.metadata
            value = _coerce(where, ".".join(path), _parse_value(value_text, kind), kind, meta)
            section = merged.get(path[0])
            merged[path[0]] = (dict(section) if isinstance(section, dict) else {}) | {path[1]: value}
        else:
            raise _unknown(where, ".".join(path), list(top))
    return merged


def read_toml(path: str | Path) -> dict[str, Any]:
    path = validate.path(path, "config")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TiedlmError(f"config {path}: no such file") from None
    except IsADirectoryError:
        raise TiedlmError(f"config {path}: is a directory, expected a .toml file") from None
    except OSError as exc:
        raise TiedlmError(f"config {path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TiedlmError(f"config {path}: not valid UTF-8 (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TiedlmError(f"config {path}: invalid TOML: {exc}") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML config, apply ``--set`` overrides, and check every key.

    A bad ``--set`` is blamed on that ``--set``; a bad value from the file, on the file.
    """
    overrides = validate.strings(overrides, "overrides")
    raw = read_toml(path)
    raw.setdefault("name", Path(path).stem)
    return config_from_dict(apply_overrides(raw, overrides), f"config {path}")
