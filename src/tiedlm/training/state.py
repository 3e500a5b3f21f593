"""What a training checkpoint holds besides the weights, and how it is read back.

``trainer_state.json`` carries :class:`Progress`, the optimizer's plain state, the data
position and (mid-epoch) the running sums of the interrupted epoch; ``trainer_state.safetensors``
carries the tensors: the RNG states (``rng.*``), the optimizer's (``optim.<param>.<key>``) and,
mid-epoch, the recurrent state (``state.0``, ``state.1``, …). docs/checkpoints.md lays them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tiedlm.config import TrainConfig


@dataclass
class Progress:
    """What the trainer must remember between epochs; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    best_valid_ppl: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one
    elapsed_s: float = 0.0  # training + validation wall time of completed epochs
    last_epoch_s: float = 0.0  # wall time of the last completed epoch (predicts the next one)
    lr_scale: float = 1.0  # halved at every rollback after non-finite steps
    rollbacks: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def stop_reason(self, train: TrainConfig) -> str | None:
        """Why the schedule ends here (max_epochs, patience, time_limit), or None while it goes on."""
        if self.epoch >= train.max_epochs:
            return "max_epochs"
        if self.bad_epochs >= train.patience:
            return "patience"
        limit_s = train.time_limit_minutes * 60
        if limit_s and self.epoch and self.elapsed_s + self.last_epoch_s > limit_s:
            return "time_limit"
        return None

    def time_left(self, train: TrainConfig, epoch: int) -> str:
        """Time left for the epochs after ``epoch``, at most (early stopping may end sooner): ≤12m, ≤1.7h."""
        remaining = train.max_epochs - epoch
        if not self.last_epoch_s or remaining <= 0:
            return "?" if remaining > 0 else "0m"
        minutes = remaining * self.last_epoch_s / 60
        return f"≤{minutes / 60:.1f}h" if minutes >= 90 else f"≤{minutes:.0f}m"


@dataclass
class EpochPosition:
    """Where an interrupted epoch stopped: the next window, the recurrent state and the running sums."""

    window: int = 0
    state: tuple[torch.Tensor, ...] | None = None
    sums: tuple[float, float, float] = (0.0, 0.0, 0.0)  # cross-entropy, KL, tokens
    elapsed_s: float = 0.0


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimizer state_dict as JSON plus tensors ("optim.<param>.<key>"), e.g. AdamW's moments."""
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    tensors = {}
    for index, values in state["state"].items():
        entry = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
                entry[key] = {"tensor": f"optim.{index}.{key}"}
            else:
                entry[key] = value
        plain["state"][str(index)] = entry
    return plain, tensors


def join_optimizer_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The inverse of :func:`split_optimizer_state`: a state_dict for ``optimizer.load_state_dict``."""
    state = {}
    for index, values in plain.get("state", {}).items():
        state[int(index)] = {
            key: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
            for key, value in values.items()
        }
    return {"param_groups": plain["param_groups"], "state": state}


def rng_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The global RNG states and the model's dropout-mask generator's, as checkpoint tensors."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.masks": model.mask_generator.get_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def restore_rng(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    model.mask_generator.set_state(tensors["rng.masks"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def recurrent_state(tensors: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, ...]:
    """The recurrent state saved with a mid-epoch checkpoint: state.0, state.1, … (state.h/.c before v0.2)."""
    if "state.h" in tensors:
        return tensors["state.h"].to(device), tensors["state.c"].to(device)
    count = sum(1 for name in tensors if name.startswith("state."))
    if not count:
        raise KeyError("state.0")
    return tuple(tensors[f"state.{index}"].to(device) for index in range(count))


def trainer_state(
    progress: Progress,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    corpus_record: dict[str, Any],
    position: EpochPosition | None,
    state: tuple[torch.Tensor, ...] | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """trainer_state.json and trainer_state.safetensors of a checkpoint at ``position``.

    ``state`` is the recurrent state of all ranks (gathered), saved only mid-epoch."""
    window = position.window if position else 0
    optimizer_json, optimizer_tensors = split_optimizer_state(optimizer.state_dict())
    plain = {
        "progress": progress.to_dict(),
        "optimizer": optimizer_json,
        "data_position": {"epoch": progress.epoch + 1, "window": window},
        "corpus": corpus_record,
    }
    tensors = rng_tensors(model) | optimizer_tensors
    if position is not None and window:
        plain["epoch_partial"] = {"sums": list(position.sums), "elapsed_s": position.elapsed_s}
        tensors.update({f"state.{index}": part for index, part in enumerate(state)})
    return plain, tensors


def restore_trainer_state(
    plain: dict[str, Any], tensors: dict[str, torch.Tensor], optimizer, model, local_state, device
) -> tuple[Progress, EpochPosition]:
    """Load the optimizer and RNG states of a checkpoint; return its progress and data position.

    ``local_state`` picks this rank's streams out of the saved recurrent state. Raises KeyError,
    TypeError, ValueError or RuntimeError where the state is incomplete."""
    progress = Progress(**plain["progress"])
    optimizer.load_state_dict(join_optimizer_state(plain["optimizer"], tensors))
    restore_rng(model, tensors)
    window = int(plain["data_position"]["window"])
    partial = plain.get("epoch_partial", {})
    model_state = local_state(recurrent_state(tensors, device)) if window else None
    position = EpochPosition(
        window, model_state, tuple(partial.get("sums", (0.0, 0.0, 0.0))), partial.get("elapsed_s", 0.0)
    )
    return progress, position
