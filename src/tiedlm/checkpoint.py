"""Checkpoint folders: the one way a model leaves and re-enters the program.

A checkpoint is a folder of config, vocabulary, weights and (for training
checkpoints) trainer state, sealed by a SHA-256 manifest that every load
checks; docs/checkpoints.md lays out its files and the run folder around it.
Folders are written under a temporary name and renamed into place, and removed
by first renaming them away, so no reader, and no crash, can leave a
half-written checkpoint under a real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
MANIFEST = "manifest.json"
_NAME = re.compile(r"^epoch-(\d{4,})(?:\+(\d{6,}))?$")


@dataclass
class Checkpoint:
    path: Path
    config: Config
    vocab: Vocabulary
    model: torch.nn.Module
    trainer_state: dict[str, Any] = field(default_factory=dict)
    trainer_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def checkpoint_name(epochs_done: int, window: int = 0) -> str:
    """Folder name for the position after ``epochs_done`` epochs and ``window`` windows of the next."""
    return f"epoch-{epochs_done:04d}" + (f"+{window:06d}" if window else "")


def _position(path: Path) -> tuple[int, int] | None:
    match = _NAME.match(path.name)
    return (int(match[1]), int(match[2] or 0)) if match else None


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_dir(path: Path) -> None:
    """Delete a folder by first renaming it to a hidden name, so it vanishes atomically."""
    trash = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def _install_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing what is there."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    _fsync_dir(path.parent)


def _digest_of(digests: dict[str, str]) -> str:
    """A digest of the manifest's own entries, so that an edit to the manifest shows as one."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def _seal(folder: Path) -> None:
    """Write the manifest of ``folder``'s files and flush everything to disk."""
    files = sorted(p for p in folder.iterdir() if p.name != MANIFEST)
    digests = {p.name: _sha256(p) for p in files}
    manifest = {"sha256": digests, "self": _digest_of(digests)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for child in folder.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


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
        tensors = {k: v.detach().cpu().contiguous() for k, v in (trainer_tensors or {}).items()}
        save_file(tensors, str(tmp / STATE_TENSORS))
    _seal(tmp)
    _install_dir(tmp, path)


def link_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` a copy of checkpoint ``source`` (hard links: files are never rewritten in place)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for child in source.iterdir():
        try:
            os.link(child, tmp / child.name)
        except OSError:
            shutil.copy2(child, tmp / child.name)
    _fsync_dir(tmp)
    _install_dir(tmp, target)


def verify_checkpoint(path: Path) -> None:
    """Check every file against the manifest; the error names the first bad file."""
    manifest_path = path / MANIFEST
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest, own = raw["sha256"], raw["self"]
        intact = isinstance(manifest, dict) and own == _digest_of(manifest)
    except FileNotFoundError:
        raise TiedlmError(f"checkpoint {manifest_path}: missing (the checkpoint is incomplete)") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        raise TiedlmError(f"checkpoint {manifest_path}: unreadable or altered")
    if MODEL_FILE not in manifest:
        raise TiedlmError(f"checkpoint {manifest_path}: does not list {MODEL_FILE}")
    for name, expected in manifest.items():
        file = path / str(name)
        if not file.is_file():
            raise TiedlmError(f"checkpoint {file}: missing")
        if _sha256(file) != expected:
            raise TiedlmError(f"checkpoint {file}: SHA-256 does not match the manifest (truncated or altered)")


def is_checkpoint(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() and (path / "config.json").is_file()


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints in ``checkpoints/``, oldest position first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _position(p) is not None and p.is_dir()]
    return sorted(found, key=_position)


def remove_stale(run_dir: Path) -> list[Path]:
    """Delete temporary folders and files that an interrupted write left behind; return them."""
    stale = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            stale += [
                p for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
            ]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return stale


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint folder, or a run folder → its ``best`` (or, prefer="latest", newest) checkpoint."""
    path = Path(path)
    if not path.exists():
        raise TiedlmError(f"checkpoint {path}: no such file or directory")
    if is_checkpoint(path):
        return path
    candidates = [path / "best"] if prefer == "best" else run_checkpoints(path)[::-1]
    for candidate in candidates:
        if is_checkpoint(candidate):
            return candidate
    raise TiedlmError(
        f"checkpoint {path}: not a checkpoint folder (no {MODEL_FILE} and config.json) nor a run with one"
    )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", prefer: str = "best") -> Checkpoint:
    """Verify and load config, vocabulary, weights (and trainer state when present) from a checkpoint folder."""
    path = resolve_checkpoint(path, prefer)
    verify_checkpoint(path)
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


def load_latest_good(run_dir: Path, device: str | torch.device = "cpu") -> tuple[Checkpoint, list[str]]:
    """The newest checkpoint of a run that verifies, and one line per newer one that did not."""
    skipped = []
    for candidate in run_checkpoints(run_dir)[::-1]:
        try:
            return load_checkpoint(candidate, device), skipped
        except TiedlmError as exc:
            skipped.append(str(exc))
    if skipped:
        raise TiedlmError(f"--resume {run_dir}: no intact checkpoint left ({skipped[0]})")
    raise TiedlmError(
        f"--resume {run_dir}: no checkpoints in {run_dir / 'checkpoints'} (training never got going: start it again)"
    )
