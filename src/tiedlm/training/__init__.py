"""Training: one config into one run folder (docs/method.md §6, docs/checkpoints.md, docs/faults.md).

step.py     TrainingStep: forward → objective → backward → clip → update, on one BPTT window;
            the optimizer and the lr schedule
loop.py     Trainer: fit (epochs until the schedule ends) and train_epoch (windows)
state.py    what a training checkpoint holds besides the weights: Progress, EpochPosition,
            the optimizer's state as JSON + tensors, RNG and recurrent state
records.py  run.json's records, an epoch's metrics line, final.json
resume.py   --resume: which run, config, checkpoint and corpus
faults.py   signals (StopFlag, Interrupted), rollback after non-finite steps, RunLock,
            the writable and free-space checks, best/ repair
"""

from tiedlm.training.faults import Interrupted, RunLock
from tiedlm.training.loop import Trainer
from tiedlm.training.records import tensorboard_writer
from tiedlm.training.resume import corpus_location, resolve_run
from tiedlm.training.state import EpochPosition, Progress, join_optimizer_state, split_optimizer_state
from tiedlm.training.step import PHASES, StepResult, TrainingStep, learning_rate, make_optimizer

__all__ = [
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
    "resolve_run",
    "split_optimizer_state",
    "tensorboard_writer",
]
