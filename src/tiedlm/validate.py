"""Checks of the arguments users pass, shared by the Python API and the command line.

Each library function that takes user input checks it with these at its start, and the
CLI calls the same functions, so both refuse a value the same way: an
:class:`~tiedlm.errors.InvalidArgument` (a ``ValueError``) or
:class:`~tiedlm.errors.InvalidArgumentType` (a ``TypeError``) whose message is
``NAME: what is wrong, got VALUE``. The CLI prints it under the option's name
(``--top-k`` for ``top_k``).
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Iterable
from pathlib import Path

from tiedlm.errors import InvalidArgument, InvalidArgumentType

# What torch.manual_seed and torch.Generator.manual_seed accept (negative seeds are mapped
# to 2**64 + seed); outside it they raise "Overflow when unpacking long long".
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
INT64_MAX = 2**63 - 1


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def integer(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int (bools and fractions refused) within [low, high]."""
    if isinstance(value, bool):
        raise InvalidArgumentType(name, f"must be an integer, got {shown(value)}")
    try:
        number = operator.index(value)  # int, numpy integers; not 2.0 or "2"
    except TypeError:
        raise InvalidArgumentType(name, f"must be an integer, got {shown(value)}") from None
    if low is not None and number < low:
        raise InvalidArgument(name, f"must be at least {low}, got {shown(number)}")
    if high is not None and number > high:
        raise InvalidArgument(name, f"must be at most {high}, got {shown(number)}")
    return number


def real(value: object, name: str, *, low: float | None = None) -> float:
    """``value`` as a finite float ≥ ``low`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentType(name, f"must be a number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise InvalidArgument(name, f"must be a finite number, got {shown(value)}")
    if low is not None and number < low:
        raise InvalidArgument(name, f"must be ≥ {low:g}, got {shown(value)}")
    return number


def seed(value: object, name: str = "seed") -> int | None:
    """None (a random seed) or an integer that torch's generators accept."""
    return None if value is None else integer(value, name, low=SEED_MIN, high=SEED_MAX)


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentType(name, f"must be True or False, got {shown(value)}")
    return value


def strings(value: object, name: str, *, allow_empty: bool = True) -> list[str]:
    """A string (a list of one) or an iterable of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise InvalidArgumentType(name, f"must be a string or a list of strings, got {shown(value)}")
    items = list(value)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidArgumentType(f"{name}[{index}]", f"must be a string, got {shown(item)}")
    if not items and not allow_empty:
        raise InvalidArgument(name, "is empty: give at least one text")
    return items


def path(value: object, name: str = "path") -> Path:
    """A usable file-system path: a string or ``os.PathLike``, not empty, without NUL bytes."""
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, (str, os.PathLike)):
        raise InvalidArgumentType(name, f"must be a path (str or os.PathLike), got {shown(value)}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise InvalidArgumentType(name, f"must be a path (str or os.PathLike), got {shown(value)}")
    if not text:
        raise InvalidArgument(name, "is empty")
    if "\0" in text:
        raise InvalidArgument(name, f"contains a NUL byte: {shown(text)}")
    return Path(text)


def generation(words: object, temperature: object, top_k: object, seed_value: object) -> tuple:
    """The sampling settings of :func:`tiedlm.generate.generate_batch`, checked.

    ``words`` ≥ 1; ``temperature`` finite and ≥ 0 (0 = greedy; however small or large
    otherwise, sampling stays well defined); ``top_k`` an integer ≥ 0 (0 = all words;
    more than |V| means all); ``seed`` None or within what torch accepts.
    """
    return (
        integer(words, "words", low=1, high=INT64_MAX),
        real(temperature, "temperature", low=0.0),
        integer(top_k, "top_k", low=0),
        seed(seed_value),
    )


def device(value: object, name: str = "device"):
    """A ``torch.device`` (or its name) that this machine has: cpu, or cuda[:N] where CUDA is present."""
    import torch

    if isinstance(value, str) and "\0" not in value:
        try:
            value = torch.device(value)
        except (RuntimeError, ValueError):
            raise InvalidArgument(name, f"not a device name (cpu, cuda, cuda:N), got {shown(value)}") from None
    if not isinstance(value, torch.device):
        raise InvalidArgumentType(name, f"must be a torch.device or a device name, got {shown(value)}")
    if value.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(name, f"{value} requested but CUDA is not available")
        if value.index is not None and value.index >= torch.cuda.device_count():
            raise InvalidArgument(name, f"{value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return value
    if value.type != "cpu":
        raise InvalidArgument(name, f"must be cpu or cuda[:N], got {shown(str(value))}")
    return torch.device("cpu")  # "cpu:0" is the same device, but safetensors takes only "cpu"
