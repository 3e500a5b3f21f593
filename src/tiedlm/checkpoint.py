"""Checkpoint folders: the one way a model leaves and re-enters the program.

    CKPT/
      config.json                  the full resolved Config
      vocab.txt                    one word per line, line i = id i
      model.safetensors            weights (tied tensors stored once)
      trainer_state.json           epoch, schedule, early-stopping counters   (training checkpoints only)
      trainer_state.safetensors    RNG states, optimizer tensors              (training checkpoints only)

A training run keeps ``RUN/checkpoints/epoch-NNNN/`` (the last two) and
``RUN/best/`` (best validation perplexity). Folders are written under a
temporary name and renamed into place, so a reader never sees a half-written
checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from tiedlm.config import Config, config_from_dict
from tiedlm.data import Vocabulary
from tiedlm.errors import TiedlmError
from tiedlm.models import build_model

MODEL_FILE = "model.safetensors"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


@dataclass
class Checkpoint:
    path: Path
    config: Config
    vocab: Vocabulary
    model: torch.nn.Module
    trainer_state: dict[str, Any] = field(default_factory=dict)
    trainer_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file under a temporary name, flush it to disk, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    config: Config,
    vocab: Vocabulary,
    trainer_state: dict[str, Any] | None = None,
    trainer_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint folder atomically; an existing folder at ``path`` is replaced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    vocab.save(tmp / "vocab.txt")
    save_model(model, str(tmp / MODEL_FILE))
    if trainer_state is not None:
        (tmp / STATE_JSON).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in (trainer_tensors or {}).items()}, str(tmp / STATE_TENSORS)
        )
    for child in tmp.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    _fsync_dir(path.parent)


def is_checkpoint(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() and (path / "config.json").is_file()


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete epoch checkpoints, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("epoch-") and is_checkpoint(p))


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint folder, or a run folder → its ``best`` (or, prefer="latest", newest epoch) checkpoint."""
    path = Path(path)
    if not path.exists():
        raise TiedlmError(f"checkpoint {path}: no such file or directory")
    if is_checkpoint(path):
        return path
    epochs = epoch_checkpoints(path)
    candidates = [path / "best"] if prefer == "best" else []
    candidates += epochs[::-1] if prefer == "latest" else []
    for candidate in candidates:
        if is_checkpoint(candidate):
            return candidate
    raise TiedlmError(
        f"checkpoint {path}: not a checkpoint folder (no {MODEL_FILE} and config.json) nor a run with one"
    )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", prefer: str = "best") -> Checkpoint:
    """Load config, vocabulary, weights (and trainer state when present) from a checkpoint folder."""
    path = resolve_checkpoint(path, prefer)
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TiedlmError(f"checkpoint {path / 'config.json'}: unreadable ({exc})") from None
    if not isinstance(raw, dict):
        raise TiedlmError(f"checkpoint {path / 'config.json'}: expected a JSON object")
    config = config_from_dict(raw, f"checkpoint {path / 'config.json'}")
    vocab = Vocabulary.load(path / "vocab.txt")
    model = build_model(config.model, len(vocab))
    try:
        load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TiedlmError(f"checkpoint {path / MODEL_FILE}: cannot load weights ({first})") from None
    model.to(device)
    checkpoint = Checkpoint(path, config, vocab, model)
    if (path / STATE_JSON).is_file():
        try:
            checkpoint.trainer_state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
            checkpoint.trainer_tensors = load_file(str(path / STATE_TENSORS))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as exc:
            raise TiedlmError(f"checkpoint {path}: trainer state unreadable ({exc})") from None
    return checkpoint
