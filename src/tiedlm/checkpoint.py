"""Checkpoint folders: the one way a model leaves and re-enters the program.

A checkpoint is a folder of config, vocabulary, weights and (for training
checkpoints) trainer state, sealed by a SHA-256 manifest that every load
checks; docs/checkpoints.md lays out its files and the run folder around it.
Folders are written under a temporary name and renamed into place, and removed
by first renaming them away, so no reader, and no crash, can leave a
half-written checkpoint under a real name. A write that fails (a full disk, say) removes its
temporary folder and leaves whatever was there before as it was.

Between the steps of a write sit named fault points (:func:`fault_point`): the documented hook
through which the tests and scripts/fault_campaign.py kill a write at a chosen moment.

Longer than 400 lines because every step of an atomic checkpoint write, its fault points and
every check of a loaded one stay in one module, where they read in order.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from tiedlm.config import Config, config_from_dict
from tiedlm.data import Vocabulary
from tiedlm.errors import DiskFull, TiedlmError
from tiedlm.models import build_model

MODEL_FILE = "model.safetensors"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
MANIFEST = "manifest.json"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"
CHECKPOINT_FILES = (CONFIG_FILE, VOCAB_FILE, MODEL_FILE, STATE_JSON, STATE_TENSORS, MANIFEST)
_NAME = re.compile(r"^epoch-(\d{4,})(?:\+(\d{6,}))?$")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


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


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{max(1, round(n / 1024))} KiB"


def _free_space(path: Path) -> int | None:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def _os_error(exc: Exception) -> OSError | None:
    """The OSError behind ``exc``; safetensors reports one as "… (os error 28)" in a SafetensorError."""
    if isinstance(exc, OSError):
        return exc
    match = _OS_ERROR.search(str(exc)) if isinstance(exc, SafetensorError) else None
    return OSError(int(match[1]), os.strerror(int(match[1]))) if match else None


def write_error(path: Path, exc: OSError, needed: int, what: str = "") -> TiedlmError:
    """The one-line error for a failed write of ``path`` (which has been cleaned up after).

    Out of space or quota: a :class:`DiskFull` that says about how much ``path`` needs and
    how much is free; otherwise the system's reason.
    """
    where = f"{what} {path}".strip()
    if exc.errno in _NO_SPACE:
        free = _free_space(path)
        left = f", {_size(free)} free" if free is not None else ""
        return DiskFull(
            f"{where}: no space left on the device (it needs about {_size(needed)}{left}); "
            "nothing that was there before was changed"
        )
    return TiedlmError(f"{where}: cannot write ({exc.strerror or exc})")


def _discard(path: Path) -> None:
    """Remove what a failed write left under its temporary name (a failure here leaves it to remove_stale)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file under a temporary name, flush it to disk, then rename it into place.

    A failure (a full disk, say) removes the temporary file, leaves ``path`` as it was and
    raises a one-line :class:`TiedlmError` (:class:`DiskFull` for lack of space).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = text.encode("utf-8")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise write_error(path, exc, len(data)) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


FAULT_ENV = "TIEDLM_FAULT_AT"
FAULT_POINTS = ("save_model", "_seal", "_install_dir", "remove_dir")
_faults_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """The fault hook (docs/faults.md): with ``TIEDLM_FAULT_AT=NAME:N`` in the environment, the
    N-th time this process reaches the point NAME it kills itself with SIGKILL. The points:

        save_model    the weights are in the temporary folder; nothing sealed or renamed yet
        _seal         every file written, the manifest not yet
        _install_dir  the folder being replaced renamed away (if there was one), the new one not in place
        remove_dir    an old checkpoint renamed to its hidden name, not yet deleted

    Without the variable this is one dictionary lookup.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or not wanted.startswith(name + ":"):
        return
    nth = wanted.partition(":")[2]
    if not nth.isdigit() or name not in FAULT_POINTS:
        raise TiedlmError(f"{FAULT_ENV}: expected POINT:N with POINT one of {', '.join(FAULT_POINTS)}; got {wanted!r}")
    _faults_reached[name] = _faults_reached.get(name, 0) + 1
    if _faults_reached[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


def remove_dir(path: Path) -> None:
    """Delete a folder by first renaming it to a hidden name, so it vanishes atomically."""
    trash = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.rename(path, trash)
    fault_point("remove_dir")
    shutil.rmtree(trash)


def _install_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing what is there (put back if that fails)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        fault_point("_install_dir")
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(old, path)
            raise
        shutil.rmtree(old)
    else:
        fault_point("_install_dir")
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
    """Write a checkpoint folder atomically; an existing folder at ``path`` is replaced.

    (:meth:`tiedlm.LanguageModel.save_pretrained` first checks, with :func:`check_save_target`,
    that what it would replace is a checkpoint.) A failed write, a full disk included, leaves
    no temporary folder behind and ``path`` as it was, and raises a one-line :class:`TiedlmError`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in (trainer_tensors or {}).items()}
    needed = _tensor_bytes(model.state_dict().values()) + _tensor_bytes(tensors.values()) + (64 << 10)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        vocab.save(tmp / VOCAB_FILE)
        save_model(model, str(tmp / MODEL_FILE))
        fault_point("save_model")
        if trainer_state is not None:
            (tmp / STATE_JSON).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
            save_file(tensors, str(tmp / STATE_TENSORS))
        fault_point("_seal")
        _seal(tmp)
        _install_dir(tmp, path)
    except (OSError, SafetensorError) as exc:
        error = _os_error(exc)
        if error is None:
            raise
        _discard(tmp)
        raise write_error(path, error, needed, "checkpoint") from None


def _tensor_bytes(tensors) -> int:
    """Bytes of ``tensors`` as safetensors stores them (a storage shared by tied weights once)."""
    seen, total = set(), 0
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def check_save_target(path: Path, overwrite: bool, where: str = "save_pretrained") -> None:
    """Refuse to save at ``path`` where that would destroy anything but a tiedlm checkpoint.

    Nothing there, or an empty folder: fine. A checkpoint folder (only the files a checkpoint
    has): replaced only with ``overwrite``. Anything else (a file, a link, a folder holding other
    files, a run folder) is refused whatever ``overwrite`` says. The command line has no way to
    overwrite: ``tiedlm train`` refuses an --out that holds a run, and nothing else writes
    checkpoints.
    """
    try:
        if path.is_symlink():
            raise TiedlmError(f"{where} {path}: is a symbolic link; refusing to replace it")
        if not path.exists():
            return
        if not path.is_dir():
            raise TiedlmError(f"{where} {path}: exists and is not a folder; refusing to replace it")
        entries = sorted(path.iterdir())
    except OSError as exc:
        raise TiedlmError(f"{where} {path}: cannot inspect it ({exc.strerror or exc})") from None
    if not entries:
        return
    if _is_run(path):
        raise TiedlmError(f"{where} {path}: is a training run folder, not a checkpoint; refusing to replace it")
    foreign = [e.name for e in entries if e.name not in CHECKPOINT_FILES or not e.is_file() or e.is_symlink()]
    if foreign or not is_checkpoint(path):
        held = f"it holds {foreign[0]!r}" if foreign else "it lacks " + ", ".join(_missing_files(path))
        raise TiedlmError(f"{where} {path}: is a folder but not a tiedlm checkpoint ({held}); refusing to replace it")
    if not overwrite:
        raise TiedlmError(f"{where} {path}: already holds a checkpoint; pass overwrite=True to replace it")


def link_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` a copy of checkpoint ``source`` (hard links: files are never rewritten in place).

    A failed write (a full disk: a copy where links are impossible needs the checkpoint's size)
    leaves ``target`` as it was and raises a one-line :class:`TiedlmError`.
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    needed = 0
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for child in source.iterdir():
            needed += child.stat().st_size
            try:
                os.link(child, tmp / child.name)
            except OSError:
                shutil.copy2(child, tmp / child.name)
        _fsync_dir(tmp)
        _install_dir(tmp, target)
    except OSError as exc:
        _discard(tmp)
        raise write_error(target, exc, max(needed, 4096), "checkpoint") from None


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
    return (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file()


def _missing_files(path: Path) -> list[str]:
    return [name for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE, MANIFEST) if not (path / name).is_file()]


def _incomplete(path: Path) -> TiedlmError:
    missing = ", ".join(_missing_files(path))
    return TiedlmError(f"checkpoint {path}: {missing} missing (the checkpoint is incomplete)")


def _is_run(path: Path) -> bool:
    return any((path / name).exists() for name in ("run.json", "metrics.jsonl", "checkpoints", "best"))


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
    try:
        exists, folder = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long
        raise TiedlmError(f"checkpoint {path!r}: not a usable path ({exc})") from None
    if not exists:
        raise TiedlmError(f"checkpoint {path}: no such file or directory")
    if not folder:
        raise TiedlmError(f"checkpoint {path}: is a file, not a checkpoint or run folder")
    if is_checkpoint(path):
        return path
    if not _is_run(path):  # a run folder has a config.json of its own
        if any((path / name).exists() for name in CHECKPOINT_FILES):  # a checkpoint folder with files gone
            raise _incomplete(path)
        raise TiedlmError(
            f"checkpoint {path}: not a checkpoint folder ({MODEL_FILE}, {CONFIG_FILE}, …) "
            "nor a run folder (best/, checkpoints/)"
        )
    candidates = [path / "best"] if prefer == "best" else run_checkpoints(path)[::-1]
    for candidate in candidates:
        if is_checkpoint(candidate):
            return candidate
    best = path / "best"
    if prefer == "best" and best.is_dir():
        raise _incomplete(best)
    held = run_checkpoints(path)
    hint = f"; its newest checkpoint is {held[-1]}" if held else ""
    wanted = "best/ checkpoint (no epoch has finished yet)" if prefer == "best" else "intact checkpoint"
    raise TiedlmError(f"run {path}: has no {wanted}{hint}")


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
    vocab = Vocabulary.load(path / VOCAB_FILE)
    try:
        model = build_model(config.model, len(vocab))
    except TiedlmError as exc:  # e.g. a model too large for this machine's memory
        raise TiedlmError(f"checkpoint {path / CONFIG_FILE}: {exc}") from None
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


def manifest_digest(path: Path) -> str:
    """The digest that seals a verified checkpoint's manifest (it changes when any file does)."""
    return json.loads((path / MANIFEST).read_text(encoding="utf-8"))["self"]


def differs(theirs, ours, name: str) -> str:
    """ "model.NAME is A there but B here", or "" when the two model settings agree on NAME."""
    a, b = getattr(theirs, name), getattr(ours, name)
    return "" if a == b else f"model.{name} is {a!r} there but {b!r} here"


def shape_mismatch(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> str:
    """The first weight that one state dict lacks or holds in another shape, in words ("" when they fit)."""
    for name in sorted(theirs.keys() | ours.keys()):
        a, b = theirs.get(name), ours.get(name)
        if a is None or b is None or a.shape != b.shape:
            return f"{name} is {_shape(a)} there but {_shape(b)} here"
    return ""


def _shape(tensor: torch.Tensor | None) -> str:
    return "absent" if tensor is None else "×".join(map(str, tensor.shape))


def init_weights_from(
    model: torch.nn.Module, config: Config, vocab: Vocabulary, source: str | Path, device
) -> dict[str, Any]:
    """Copy the weights of ``source`` (a run folder → its best/, or a checkpoint folder) into ``model``.

    Only the weights: optimizer, schedule, counters and RNG start afresh. The source is verified
    against its manifest, and its architecture and vocabulary must be those of ``config`` and
    ``vocab``. Returns where the weights came from, for run.json and final.json.
    """
    where = f"train.init_from {source}"
    try:
        checkpoint = load_checkpoint(source, device)
    except TiedlmError as exc:
        raise TiedlmError(f"{where}: {exc}") from None
    theirs, ours = checkpoint.config.model, config.model
    for name in ("architecture", "tie_weights"):  # tying shares a tensor, so the shapes alone do not show it
        if getattr(theirs, name) != getattr(ours, name):
            raise TiedlmError(f"{where}: {differs(theirs, ours, name)}")
    if theirs.has_output_bias() != ours.has_output_bias():
        have = "has" if theirs.has_output_bias() else "has no"
        raise TiedlmError(f"{where}: its decoder {have} output bias, unlike this config's (model.output_bias)")
    if checkpoint.vocab != vocab:
        first = next(
            (i for i, (a, b) in enumerate(zip(checkpoint.vocab.itos, vocab.itos, strict=False)) if a != b), None
        )
        detail = (
            f"word {first} is {checkpoint.vocab.itos[first]!r} there but {vocab.itos[first]!r} here"
            if first is not None
            else f"{len(checkpoint.vocab)} words there, {len(vocab)} here"
        )
        raise TiedlmError(f"{where}: the vocabulary differs from this corpus's ({detail})")
    misfit = shape_mismatch(checkpoint.model.state_dict(), model.state_dict())
    if misfit:  # any architecture: the settings that differ are named, whichever of them fix the shapes
        settings = [differs(theirs, ours, f.name) for f in fields(ours) if hasattr(theirs, f.name)]
        named = "; ".join(text for text in settings if text) or "no model setting differs"
        raise TiedlmError(f"{where}: its weights do not fit this model ({misfit}; {named})")
    model.load_state_dict(checkpoint.model.state_dict())
    progress = checkpoint.trainer_state.get("progress", {})
    return {
        "source": str(Path(source).resolve()),
        "checkpoint": str(checkpoint.path.resolve()),
        "manifest_sha256": manifest_digest(checkpoint.path),
        "epoch": progress.get("epoch"),
        "best_valid_ppl": progress.get("best_valid_ppl"),
    }
