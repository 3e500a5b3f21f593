"""The names ``tiedlm.train`` had before training became the package :mod:`tiedlm.training`.

Kept so that code written against earlier versions still imports; new code imports from
:mod:`tiedlm.training`.
"""

from tiedlm.runtime import resolve_device
from tiedlm.training import (
    PHASES,
    EpochPosition,
    Interrupted,
    Progress,
    RunLock,
    StepResult,
    Trainer,
    TrainingStep,
    corpus_location,
    join_optimizer_state,
    learning_rate,
    make_optimizer,
    split_optimizer_state,
    tensorboard_writer,
)
from tiedlm.training.faults import KEEP_CHECKPOINTS, MAX_ROLLBACKS

__all__ = [
    "KEEP_CHECKPOINTS",
    "MAX_ROLLBACKS",
    "PHASES",
    "EpochPosition",
    "Interrupted",
    "Progress",
    "RunLock",
    "StepResult",
    "Trainer",
    "TrainingStep",
    "corpus_location",
    "join_optimizer_state",
    "learning_rate",
    "make_optimizer",
    "resolve_device",
    "split_optimizer_state",
    "tensorboard_writer",
]
