"""The exception types users see: the CLI prints them as a single line and exits 2.

- :class:`TiedlmError`: any problem with the user's input (a file, an option, a checkpoint).
- :class:`InvalidArgument` (also a ``ValueError``): an argument of a library function, or the
  CLI option behind it, has a wrong value; :class:`InvalidArgumentType` (also a ``TypeError``)
  a wrong type. Both carry the argument's name, so the CLI can say ``--top-k`` where the
  Python API says ``top_k``, with the same explanation.
- :class:`DiskFull`: a write ran out of space (or quota); nothing that was there before is lost.
"""

from __future__ import annotations


class TiedlmError(Exception):
    """A problem with the user's input (a file, an option, a checkpoint), not a bug.

    The message names the file or option and says what is wrong, on one line.
    """


class InvalidArgument(TiedlmError, ValueError):
    """``name`` has a value the function cannot use; ``problem`` says why (the message is ``name: problem``)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name, self.problem = name, problem

    def renamed(self, name: str) -> InvalidArgument:
        """The same error for the argument as it is spelled elsewhere (a CLI option for an API argument)."""
        return type(self)(name, self.problem)


class InvalidArgumentType(InvalidArgument, TypeError):
    """``name`` has a type the function does not take."""


class DiskFull(TiedlmError):
    """A write failed for lack of space; the message says where and about how much is needed."""
