"""The training loop (docs/method.md §6): SGD, the lr schedule, global-norm clipping,
early stopping on validation perplexity, and a checkpoint every epoch.

The objective of one window is the per-token loss summed over time and
averaged over the batch, Σ_t Σ_b J_tb / B, which is what lr = 1 assumes
(Zaremba et al.); J is cross-entropy, plus γ·τ·KL with the augmented loss.
The run folder it writes (metrics, checkpoints/, best/, final.json) is laid
out in docs/checkpoints.md.

Faults (docs/faults.md): SIGINT/SIGTERM finish the
current window, write a checkpoint and exit 130/143 (a second signal exits at
once); a step whose loss or gradient is not finite is skipped, and after
``train.nonfinite_patience`` of them in a row the last good checkpoint is
restored with the learning rate halved; ``--resume`` skips damaged
checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from torch.profiler import record_function
from tqdm import tqdm

from tiedlm.checkpoint import (
    MODEL_FILE,
    Checkpoint,
    checkpoint_name,
    init_weights_from,
    link_checkpoint,
    load_checkpoint,
    load_latest_good,
    remove_dir,
    remove_stale,
    run_checkpoints,
    save_checkpoint,
    verify_checkpoint,
    write_error,
    write_text_atomic,
)
from tiedlm.config import Config, TrainConfig
from tiedlm.cuda_graph import CapturedStep, plan_step
from tiedlm.data import BUNDLED, Corpus, batchify, bptt_windows, detach_state, load_corpus, num_windows
from tiedlm.distributed import World, check_batch
from tiedlm.errors import TiedlmError
from tiedlm.evaluate import evaluate, perplexity
from tiedlm.loss import DEFAULT_CHUNK_ELEMENTS, AugmentedLoss, cross_entropy
from tiedlm.models import build_model
from tiedlm.precision import autocast, cpu_features, resolve_precision, warn_if_emulated
from tiedlm.runtime import git_commit, hardware
from tiedlm.static_loss import STATIC_CHUNK_ELEMENTS

KEEP_CHECKPOINTS = 2
MAX_ROLLBACKS = 8


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TiedlmError(f"train.device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TiedlmError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (the paper's) or AdamW, over every parameter, at ``config.lr`` (the schedule sets it per epoch)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """lr of 1-based ``epoch``: constant, then ×lr_decay per epoch from epoch lr_decay_start on."""
    return config.lr * config.lr_decay ** max(0, epoch - config.lr_decay_start + 1)


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


@dataclass
class EpochPosition:
    """Where an interrupted epoch stopped: the next window, the recurrent state and the running sums."""

    window: int = 0
    state: tuple[torch.Tensor, ...] | None = None
    sums: tuple[float, float, float] = (0.0, 0.0, 0.0)  # cross-entropy, KL, tokens
    elapsed_s: float = 0.0


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint} written")
        self.exit_code = 128 + signum


class _Rollback(Exception):
    pass


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
    state = {}
    for index, values in plain.get("state", {}).items():
        state[int(index)] = {
            key: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
            for key, value in values.items()
        }
    return {"param_groups": plain["param_groups"], "state": state}


def tensorboard_writer(log_dir: Path):
    """A TensorBoard SummaryWriter when the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional `tensorboard` extra is not installed
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _model_state(tensors: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, ...]:
    """The recurrent state saved with a mid-epoch checkpoint: state.0, state.1, … (state.h/.c before v0.2)."""
    if "state.h" in tensors:
        return tensors["state.h"].to(device), tensors["state.c"].to(device)
    count = sum(1 for name in tensors if name.startswith("state."))
    if not count:
        raise KeyError("state.0")
    return tuple(tensors[f"state.{index}"].to(device) for index in range(count))


def _check_writable(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise TiedlmError(f"--out {run_dir}: exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test.tmp-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise TiedlmError(f"--out {run_dir}: not writable ({exc.strerror})") from None


def _check_free_space(run_dir: Path, model: torch.nn.Module) -> None:
    """Refuse to start when the disk cannot hold the checkpoints a run keeps."""
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = model_bytes * (KEEP_CHECKPOINTS + 2) + (16 << 20)  # + best/ + the one being written
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise TiedlmError(
            f"--out {run_dir}: only {free / 2**20:.0f} MiB free, checkpoints need about {needed / 2**20:.0f} MiB"
        )


class RunLock:
    """An exclusive lock on RUN/.lock, held while training; the OS drops it if the process dies."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "?"
            self.handle.close()
            raise TiedlmError(f"--out {run_dir}: another tiedlm process (pid {owner}) is training in it") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def _rng_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state(), "rng.masks": model.mask_generator.get_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def _restore_rng(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    model.mask_generator.set_state(tensors["rng.masks"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _check_resume_config(saved: Config, given: Config) -> None:
    for section in ("data", "model"):
        a, b = getattr(saved, section).__dict__, getattr(given, section).__dict__
        changed = [k for k in a if a[k] != b[k] and (section, k) != ("data", "corpus")]  # see _resume_corpus
        if changed:
            key = f"{section}.{changed[0]}"
            raise TiedlmError(
                f"--resume: {key} is {b[changed[0]]!r} in the config but {a[changed[0]]!r} in the checkpoint"
            )


def corpus_location(corpus: str) -> str:
    """``data.corpus`` as a run records it: a directory as an absolute path, so that the run can be
    resumed (and its checkpoints evaluated) from any working directory; a bundled or fetched corpus by name."""
    if corpus in BUNDLED or not Path(corpus).is_dir():
        return corpus
    return os.path.abspath(corpus)


def _resume_corpus(checkpoint: Checkpoint, given: str) -> Corpus:
    """Load the corpus a resumed run continues on, and check that it is the one it started on.

    Checkpoints record the corpus's location and the SHA-256 of its three files: a corpus
    given elsewhere (``--set data.corpus=NEW`` after a move) is accepted when they match and
    refused when they do not. Checkpoints of older versions record neither; then only the
    vocabulary is checked, as it was.
    """
    recorded = checkpoint.trainer_state.get("corpus") or {}
    was = recorded.get("corpus", checkpoint.config.data.corpus)
    try:
        corpus = load_corpus(given, vocab=checkpoint.vocab)
    except TiedlmError as exc:
        if given != was or given in BUNDLED:
            raise
        if not Path(given).is_absolute():  # as earlier versions recorded it
            raise TiedlmError(
                f"--resume: the run's corpus {given!r} is relative to the folder the run was started in; "
                f"resume from there, or give --set data.corpus=DIR ({exc})"
            ) from None
        raise TiedlmError(
            f"--resume: cannot read the run's corpus ({exc}); if it moved, give --set data.corpus=NEW_DIR "
            "(its SHA-256 must match the recorded ones)"
        ) from None
    moved = corpus_location(given) != was
    digests = recorded.get("sha256") or {}
    changed = [name for name, digest in digests.items() if corpus.sha256.get(name) != digest]
    if changed:
        name = changed[0]
        raise TiedlmError(
            f"data.corpus {given!r}: its {name} (SHA-256 {corpus.sha256.get(name, '?')[:12]}…) is not the one the run "
            f"was trained on ({was}, {digests[name][:12]}…); refusing to resume on other data"
        )
    if moved:
        checked = "SHA-256 of train, valid and test match" if digests else "no checksums recorded: vocabulary checked"
        _say(f"corpus moved: {was} → {corpus_location(given)} ({checked})")
    return corpus


def _has_metrics(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and path.stat().st_size > 0


def _say(message: str) -> None:
    print(f"tiedlm: {message}", file=sys.stderr)


@dataclass
class StepResult:
    ce: float  # summed cross-entropy of the window's tokens
    kl: float  # summed KL (0 without the augmented loss)
    tokens: int
    state: tuple[torch.Tensor, ...]
    finite: bool  # False: the loss or gradient was NaN/inf and no update was made
    stop: bool = False  # some rank was asked to stop (all ranks agree)


PHASES = ("step.forward_and_loss", "step.backward", "step.clip_and_sync", "step.optimizer")


class TrainingStep:
    """One optimisation step on one BPTT window: forward, loss, backward, clipping, SGD update.

    The objective is Σ_t Σ_b J_tb / B (summed over time, averaged over the batch). Under data
    parallelism ``forward`` is the DistributedDataParallel wrapper, each rank averages over its
    own B/N streams, and the reported sums are over all ranks.

    A step is :meth:`compute` (forward, loss, backward, clipping: no host synchronisation, the
    part a CUDA graph captures, see tiedlm/cuda_graph.py) then :meth:`finish` (one sync for the
    sums, the non-finite check, the update). ``static_shapes`` runs the augmented loss's target
    side over every token (tiedlm/static_loss.py) instead of the unique targets.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Config,
        world: World | None = None,
        forward: torch.nn.Module | None = None,
        precision: str | None = None,
        static_shapes: bool = False,
    ):
        self.model, self.optimizer = model, optimizer
        self.world = world or World()
        self.forward = forward or model
        if config.train.compile_model:
            self.forward = torch.compile(self.forward)
        loss = config.loss
        chunk = STATIC_CHUNK_ELEMENTS if static_shapes else DEFAULT_CHUNK_ELEMENTS
        self.augmented = None
        if loss.augmented:
            compiled = config.train.compile
            self.augmented = AugmentedLoss(
                loss.tau, loss.gamma, loss.detach_target, chunk, compiled=compiled, static_shapes=static_shapes
            )
        self.batch_size = config.data.batch_size // self.world.size
        self.bptt = config.data.bptt  # a full window's length (the captured step's static shape)
        self.clip = config.train.clip if config.train.clip > 0 else math.inf
        # ``precision`` is the resolved one (fp32 or bf16) where the config says auto.
        self.precision = precision or resolve_precision(config.train.precision, next(model.parameters()).device)[0]

    def window_loss(self, inputs, targets, state, masks=None):
        """Per-token cross-entropy (and KL with the augmented loss) of one window.

        ``masks``: the window's dropout masks, drawn beforehand (LSTM only); None: the model draws them."""
        model, forward = self.model, self.forward
        flat_targets = targets.flatten()
        given = {} if masks is None else {"masks": masks}
        with autocast(inputs.device, self.precision):
            if self.augmented is None:
                logits, state = forward(inputs, state, **given)
                return cross_entropy(logits.flatten(0, 1), flat_targets), None, state
            logits, state = forward(inputs, state, include_bias=False, **given)  # AL needs the bias-free W·h
            ce, kl = self.augmented.components(
                logits.flatten(0, 1), flat_targets, model.embedding.weight, model.output_bias
            )
        return ce, kl, state

    def compute(self, inputs: torch.Tensor, targets: torch.Tensor, state, masks=None):
        """Forward, loss, backward and clipping of one window into gradients that were None.

        Returns the device tensor [Σ ce, Σ kl, objective, gradient norm] (fp32) and the new state.
        Nothing here reads a value back to the host (with ``static_shapes`` nothing has a
        data-dependent shape either), so a CUDA graph can capture it.
        """
        # The record_function ranges name the phases in a torch.profiler trace (benchmarks/profile_step.py).
        with record_function(PHASES[0]):
            ce, kl, new_state = self.window_loss(inputs, targets, detach_state(state), masks)
            objective = ce.sum() if kl is None else ce.sum() + self.augmented.gamma * self.augmented.tau * kl.sum()
        with record_function(PHASES[1]):
            (objective / self.batch_size).backward()  # DDP averages the gradients over the ranks here
        with record_function(PHASES[2]):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            kl_sum = objective.new_zeros(()) if kl is None else kl.sum()
            stats = torch.stack([ce.sum(), kl_sum, objective, grad_norm]).float()
        return stats, new_state

    def finish(self, stats: torch.Tensor, tokens: int, stop: bool, new_state) -> StepResult:
        """The sums over all ranks (one sync), the non-finite check and, when finite, the update."""
        with record_function(PHASES[2]):
            flags = stats.new_tensor([float(stop), float(tokens)])
            ce_sum, kl_sum, total, norm, stops, tokens = self.world.all_reduce_sum(torch.cat([stats, flags])).tolist()
        finite = math.isfinite(total) and math.isfinite(norm)  # the same decision on every rank
        if finite:
            with record_function(PHASES[3]):
                self.optimizer.step()
        return StepResult(ce_sum, kl_sum, int(tokens), new_state, finite, stops > 0)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, state, stop: bool = False) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        stats, new_state = self.compute(inputs, targets, state)
        return self.finish(stats, targets.numel(), stop, new_state)


class Trainer:
    """Trains one configuration into one run folder.

    ``resume`` is a run folder (its newest intact checkpoint is used, damaged
    newer ones are skipped with a note) or one checkpoint folder.
    """

    def __init__(
        self, config: Config, run_dir: Path, *, resume: Path | None = None, echo=print, world: World | None = None
    ):
        self.run_dir, self.config = Path(run_dir), config
        self.world = world or World()
        self.echo = echo if self.world.main else (lambda *args, **kwargs: None)
        self.device = resolve_device(config.train.device)
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        self.precision, self.precision_reason = resolve_precision(config.train.precision, self.device)
        if self.world.main:
            warn_if_emulated(self.precision, self.device)
        check_batch(self.world, config.data.batch_size)
        self.stop_signal: int | None = None
        self.init_source: dict[str, Any] | None = None  # where train.init_from's weights came from
        self.position = EpochPosition()
        self.lock: RunLock | None = None
        self.tensorboard = None
        if self.world.main:  # only rank 0 owns (and writes) the run folder
            if resume is None and (run_checkpoints(self.run_dir) or _has_metrics(self.run_dir)):
                raise TiedlmError(
                    f"--out {self.run_dir}: already holds a run; continue it with --resume {self.run_dir} "
                    "or pick another --out"
                )
            _check_writable(self.run_dir)
            self.lock = RunLock(self.run_dir)
            if config.train.tensorboard:
                self.tensorboard = tensorboard_writer(self.run_dir / "tensorboard")
        self._previous_handlers = self._install_signal_handlers()  # before anything is written
        try:
            self._setup(resume)
        except BaseException:
            self._release()
            raise

    def _setup(self, resume: Path | None) -> None:
        config, world = self.config, self.world
        if world.main:
            for path in remove_stale(self.run_dir):
                _say(f"removed {path}, left by an interrupted write")
        world.barrier()
        if resume is not None:
            checkpoint = self._find_resume_checkpoint(Path(resume))
            _check_resume_config(checkpoint.config, config)
            self.corpus = _resume_corpus(checkpoint, config.data.corpus)
            self.model = checkpoint.model
        else:
            self.corpus = load_corpus(config.data.corpus)
        # Recorded as an absolute path, with its checksums, in config.json and every checkpoint.
        location = corpus_location(config.data.corpus)
        config = self.config = dataclasses.replace(config, data=dataclasses.replace(config.data, corpus=location))
        self.corpus_record = {"corpus": location, "sha256": self.corpus.sha256}
        for split, size, option in (
            ("train", config.data.batch_size, "data.batch_size"),
            ("valid", config.data.eval_batch_size, "data.eval_batch_size"),
            ("test", config.data.eval_batch_size, "data.eval_batch_size"),
        ):  # before anything is trained, not at the end of the first epoch or of the run
            self.corpus.check_batchable(split, size, option)
        if resume is None:
            torch.manual_seed(config.seed)
            self.model = build_model(config.model, len(self.corpus.vocab)).to(self.device)
            if config.train.init_from:
                self.init_source = init_weights_from(
                    self.model, config, self.corpus.vocab, config.train.init_from, self.device
                )
        if world.main:
            _check_free_space(self.run_dir, self.model)
        self.model.mask_generator = torch.Generator(device=self.device)
        self.model.mask_generator.manual_seed(config.seed)  # the same on every rank (see distributed.py)
        self.model.mask_batch = world.batch_slice(config.data.batch_size)
        self.optimizer = make_optimizer(self.model, config.train)
        self.forward: torch.nn.Module = self.model
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=device_ids)
        captured, self.step_info = plan_step(config, self.device, world)  # train.cuda_graph
        self.step = TrainingStep(
            self.model, self.optimizer, config, world, self.forward, self.precision, static_shapes=captured
        )
        if captured:
            self.step = CapturedStep(self.step, strict=config.train.cuda_graph == "on")
        if resume is not None:
            self._restore(checkpoint)
            if world.main:
                self._truncate_metrics(self.progress.epoch)
                self._repair_best()
                self._record_resume(checkpoint.path)
                _say(f"resuming {self.run_dir} from {checkpoint.path}")
        else:
            self.progress = Progress()
            if world.main:
                self._write_run_info()
            self.save_checkpoint()  # epoch-0000: a good state to roll back to from the start
        world.barrier()

    # --- checkpoints and resume ----------------------------------------------------------------------------

    def _find_resume_checkpoint(self, resume: Path) -> Checkpoint:
        if (resume / MODEL_FILE).exists():
            checkpoint = load_checkpoint(resume, self.device)
        else:
            checkpoint, skipped = load_latest_good(resume, self.device)
            for note in skipped:
                _say(f"skipping a damaged checkpoint: {note}")
            if skipped:
                _say(f"falling back to the previous good checkpoint {checkpoint.path}")
        if not checkpoint.trainer_state:
            raise TiedlmError(f"--resume {resume}: {checkpoint.path} has no trainer state (not a training checkpoint)")
        return checkpoint

    def _restore(self, checkpoint: Checkpoint, lr_scale: float | None = None) -> None:
        """Load the weights, optimizer, counters, RNG and data position of a training checkpoint."""
        state, tensors = checkpoint.trainer_state, checkpoint.trainer_tensors
        try:
            self.progress = Progress(**state["progress"])
            self.optimizer.load_state_dict(join_optimizer_state(state["optimizer"], tensors))
            _restore_rng(self.model, tensors)
            window = int(state["data_position"]["window"])
            partial = state.get("epoch_partial", {})
            model_state = self.world.local_state(_model_state(tensors, self.device)) if window else None
            self.position = EpochPosition(
                window, model_state, tuple(partial.get("sums", (0.0, 0.0, 0.0))), partial.get("elapsed_s", 0.0)
            )
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise TiedlmError(f"--resume: the trainer state in {checkpoint.path} is incomplete") from None
        if lr_scale is not None:
            self.progress.lr_scale = lr_scale
        if checkpoint.model is not self.model:
            self.model.load_state_dict(checkpoint.model.state_dict())

    def _repair_best(self) -> None:
        """After a crash between writing an epoch and updating best/, point best/ at the right epoch."""
        best, epoch = self.run_dir / "best", self.progress.best_epoch
        if epoch == 0:
            return
        try:
            verify_checkpoint(best)
            if json.loads((best / "trainer_state.json").read_text())["progress"]["epoch"] == epoch:
                return
        except (TiedlmError, OSError, ValueError, KeyError):
            pass
        source = self.run_dir / "checkpoints" / checkpoint_name(epoch)
        if source.is_dir():
            link_checkpoint(source, best)
            _say(f"restored {best} from {source}")
        else:
            _say(f"warning: {best} does not hold epoch {epoch} and that checkpoint is gone")

    def save_checkpoint(self, position: EpochPosition | None = None, improved: bool = False) -> Path:
        """Write the checkpoint at the current position, update best/, keep the last two.

        Every rank calls it (the recurrent state is gathered from all of them); rank 0 writes.
        """
        window = position.window if position else 0
        state = self.world.gather_state(position.state) if position is not None and window else None
        folder = self.run_dir / "checkpoints" / checkpoint_name(self.progress.epoch, window)
        if self.world.main:
            self._write_checkpoint(folder, position, state, improved)
        self.world.barrier()
        return folder

    def _write_checkpoint(self, folder: Path, position: EpochPosition | None, state, improved: bool) -> None:
        window = position.window if position else 0
        optimizer_json, optimizer_tensors = split_optimizer_state(self.optimizer.state_dict())
        trainer_state = {
            "progress": self.progress.to_dict(),
            "optimizer": optimizer_json,
            "data_position": {"epoch": self.progress.epoch + 1, "window": window},
            "corpus": self.corpus_record,
        }
        tensors = _rng_tensors(self.model) | optimizer_tensors
        if position is not None and window:
            trainer_state["epoch_partial"] = {"sums": list(position.sums), "elapsed_s": position.elapsed_s}
            tensors.update({f"state.{index}": part for index, part in enumerate(state)})
        save_checkpoint(folder, self.model, self.config, self.corpus.vocab, trainer_state, tensors)
        if improved:
            link_checkpoint(folder, self.run_dir / "best")
        for old in run_checkpoints(self.run_dir)[:-KEEP_CHECKPOINTS]:
            remove_dir(old)

    def _rollback(self) -> None:
        if self.progress.rollbacks >= MAX_ROLLBACKS:
            raise TiedlmError(
                f"{self.run_dir}: training diverged: still non-finite after {MAX_ROLLBACKS} rollbacks "
                "(each halved the learning rate)"
            )
        lr_scale, rollbacks, skipped = (
            self.progress.lr_scale / 2,
            self.progress.rollbacks + 1,
            self.progress.skipped_steps,
        )
        checkpoint, notes = load_latest_good(self.run_dir, self.device)
        for note in notes:
            _say(f"skipping a damaged checkpoint: {note}")
        self._restore(checkpoint, lr_scale=lr_scale)
        self.progress.rollbacks, self.progress.skipped_steps = rollbacks, skipped
        if self.world.main:
            self._truncate_metrics(self.progress.epoch)
        _say(
            f"{self.config.train.nonfinite_patience} non-finite steps in a row: restored {checkpoint.path} "
            f"and halved the learning rate (scale {lr_scale:g})"
        )

    # --- run folder bookkeeping ----------------------------------------------------------------------------

    def _write_run_info(self) -> None:
        info = {
            "command": sys.argv,
            "commit": git_commit(),
            "torch": torch.__version__,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "hardware": hardware(self.device),
            "threads": torch.get_num_threads(),
            **self._precision_info(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "corpus": self.corpus_record,
        }
        if self.init_source is not None:
            info["init_from"] = self.init_source
        info |= self._model_size()
        write_text_atomic(self.run_dir / "run.json", json.dumps(info, indent=2) + "\n")
        write_text_atomic(self.run_dir / "config.json", json.dumps(self.config.to_dict(), indent=2) + "\n")

    def _model_size(self) -> dict[str, int]:
        """Vocabulary size and trainable parameters (tied matrices once): what results tables show."""
        return {"vocab_size": len(self.corpus.vocab), "parameters": sum(p.numel() for p in self.model.parameters())}

    def _recorded_init_source(self) -> dict[str, Any] | None:
        """train.init_from's source as run.json recorded it when the run started (for a resumed run)."""
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.run_dir / "run.json").read_text(encoding="utf-8")).get("init_from")
        return None

    def _precision_info(self) -> dict[str, str]:
        """The precision this stretch of the run trains in, why, (on a CPU) the features behind it, and how
        the training step runs (eager or a CUDA graph, tiedlm/cuda_graph.py)."""
        info = {"precision": self.precision, "precision_reason": self.precision_reason, "training_step": self.step_info}
        if self.device.type == "cpu":
            info["cpu_features"] = cpu_features().describe()
        return info

    def _record_resume(self, source: Path) -> None:
        path = self.run_dir / "run.json"
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        for key, value in self._model_size().items():  # a run started before run.json recorded them
            info.setdefault(key, value)
        info.setdefault("resumed", []).append(
            {
                "from": str(source),
                "command": sys.argv,
                "commit": git_commit(),
                "torch": torch.__version__,
                "hardware": hardware(self.device),
                "threads": torch.get_num_threads(),
                **self._precision_info(),
                "from_epoch": self.progress.epoch + 1,  # this stretch trains from this epoch on
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "corpus": self.config.data.corpus,
            }
        )
        write_text_atomic(path, json.dumps(info, indent=2) + "\n")

    def _truncate_metrics(self, epoch: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):  # a line cut short by a crash is dropped
                    if json.loads(line).get("epoch", 0) <= epoch:
                        kept.append(line)
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _log_metrics(self, record: dict[str, Any]) -> None:
        if not self.world.main:
            return
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["epoch"])
            self.tensorboard.flush()
        line = json.dumps(record)
        path = self.run_dir / "metrics.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # a line cut short is dropped on resume (_truncate_metrics)
            raise write_error(path, exc, len(line) + 1) from None
        self.echo(line)

    # --- signals -------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # the second signal: leave now; every write is atomic
            os._exit(128 + signum)
        self.stop_signal = signum
        _say(f"{signal.Signals(signum).name}: finishing this window, then writing a checkpoint (again to quit now)")

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _release(self) -> None:
        """Give back the signal handlers and the run lock."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        if self.lock is not None:
            self.lock.release()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    # --- training ------------------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split (from ``self.position`` on); returns mean CE, KL and tokens."""
        config, model = self.config, self.model
        model.train()
        bptt, world = config.data.bptt, self.world
        source = world.shard(batchify(self.corpus.train, config.data.batch_size)).to(self.device)
        batch_size = source.size(1)  # this rank's streams
        windows = num_windows(source, bptt)
        if config.train.max_steps_per_epoch:
            windows = min(windows, config.train.max_steps_per_epoch)
        start = self.position
        state = start.state if start.state is not None else model.init_state(batch_size)
        sums = list(start.sums)
        bad_in_a_row = 0
        began = time.perf_counter() - start.elapsed_s
        bar = tqdm(
            total=windows * bptt * batch_size * world.size, initial=start.window * bptt * batch_size * world.size,
            desc=f"epoch {epoch}/{config.train.max_epochs}",
            unit="tok", unit_scale=True, disable=None if world.main else True, leave=False, dynamic_ncols=True,
        )  # fmt: skip
        for step, (inputs, targets) in enumerate(bptt_windows(source, bptt, start=start.window), start.window):
            if step == windows:
                break
            result = self.step(inputs, targets, state, stop=self.stop_signal is not None)
            if result.stop and self.stop_signal is None:  # another rank was signalled: stop together
                self.stop_signal = signal.SIGTERM
            if result.finite:
                state, bad_in_a_row = result.state, 0
                sums[0] += result.ce
                sums[1] += result.kl
                sums[2] += result.tokens
            else:
                bad_in_a_row += 1
                self.progress.skipped_steps += 1
                state = model.init_state(batch_size)  # a non-finite state would poison what follows
                _say(f"epoch {epoch} window {step}: non-finite loss or gradient, step skipped")
                if bad_in_a_row >= config.train.nonfinite_patience:
                    bar.close()
                    raise _Rollback()
            bar.update(targets.numel() * world.size)
            if step % 10 == 0 and sums[2]:
                running = f"{perplexity(sums[0] / sums[2]):.1f}"
                bar.set_postfix(ppl=running, run_left=self._run_eta(epoch), refresh=False)
            # Under data parallelism only the ranks' agreement counts (result.stop), so that all
            # of them stop after the same window; one process also stops for a signal that
            # arrived during this step.
            if result.stop or (not world.distributed and self.stop_signal is not None):
                bar.close()
                position = EpochPosition(step + 1, detach_state(state), tuple(sums), time.perf_counter() - began)
                raise Interrupted(self.stop_signal, self.save_checkpoint(position))
        bar.close()
        self.position = EpochPosition()
        tokens = max(sums[2], 1.0)
        return {"ce": sums[0] / tokens, "kl": sums[1] / tokens, "tokens": sums[2], "s": time.perf_counter() - began}

    def _run_eta(self, epoch: int) -> str:
        """Time left for the epochs after this one, at most (early stopping may end sooner)."""
        remaining = self.config.train.max_epochs - epoch
        if not self.progress.last_epoch_s or remaining <= 0:
            return "?" if remaining > 0 else "0m"
        minutes = remaining * self.progress.last_epoch_s / 60
        return f"≤{minutes / 60:.1f}h" if minutes >= 90 else f"≤{minutes:.0f}m"

    def fit(self) -> dict[str, Any]:
        """Train until max_epochs or early stopping, then report best/ on valid and test."""
        try:
            while not self._finished():
                if self._stop_agreed():  # arrived during set-up, validation or a checkpoint write
                    raise Interrupted(self.stop_signal, run_checkpoints(self.run_dir)[-1])
                try:
                    self._run_epoch()
                except _Rollback:
                    self._rollback()
            report = self.final_report()
            if self._stop_agreed():  # arrived during the final evaluation: the run is complete
                raise Interrupted(self.stop_signal, run_checkpoints(self.run_dir)[-1])
            return report
        finally:
            self._release()

    def _stop_agreed(self) -> bool:
        """Whether any rank has been asked to stop (in one process: whether this one has)."""
        if self.world.distributed:
            flag = torch.tensor([float(self.stop_signal is not None)], device=self.device)
            if self.world.all_reduce_sum(flag).item() > 0 and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM
        return self.stop_signal is not None

    def _finished(self) -> bool:
        return self._stop_reason() is not None

    def _stop_reason(self) -> str | None:
        train, progress = self.config.train, self.progress
        if progress.epoch >= train.max_epochs:
            return "max_epochs"
        if progress.bad_epochs >= train.patience:
            return "patience"
        limit_s = train.time_limit_minutes * 60
        if limit_s and progress.epoch and progress.elapsed_s + progress.last_epoch_s > limit_s:
            return "time_limit"
        return None

    def _run_epoch(self) -> None:
        config, progress = self.config, self.progress
        epoch = progress.epoch + 1
        lr = learning_rate(config.train, epoch) * progress.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats = self.train_epoch(epoch)
        valid_start = time.perf_counter()
        valid = evaluate(self.model, self.corpus.valid, config.data.eval_batch_size, config.data.bptt, self.precision)
        epoch_s = stats["s"] + time.perf_counter() - valid_start
        improved = valid.perplexity < progress.best_valid_ppl
        progress.epoch = epoch
        progress.elapsed_s += epoch_s
        progress.last_epoch_s = epoch_s
        if improved:
            progress.best_valid_ppl, progress.best_epoch, progress.bad_epochs = valid.perplexity, epoch, 0
        else:
            progress.bad_epochs += 1
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_ppl": perplexity(stats["ce"]),
            "valid_ppl": valid.perplexity,
            "best_valid_ppl": progress.best_valid_ppl,
            "train_tokens_per_s": stats["tokens"] / stats["s"] if stats["s"] > 0 else 0.0,
            "epoch_s": epoch_s,
            "elapsed_s": progress.elapsed_s,
            "skipped_steps": progress.skipped_steps,
        }
        if self.step.augmented is not None:
            record["train_kl"] = stats["kl"]
        if isinstance(self.step, CapturedStep):
            record["windows"] = self.step.counts()  # replayed from the CUDA graph, buffered, eager (so far)
        self._log_metrics(record)  # before the checkpoint: a resume from epoch-1 drops this line
        self.save_checkpoint(improved=improved)

    def final_report(self) -> dict[str, Any]:
        if not (self.run_dir / "best" / MODEL_FILE).is_file():
            raise TiedlmError(f"{self.run_dir}: no epoch reached a finite validation perplexity (training diverged)")
        load_model(self.model, str(self.run_dir / "best" / MODEL_FILE), device=str(self.device))
        data = self.config.data
        precision = self.precision
        valid = evaluate(self.model, self.corpus.valid, data.eval_batch_size, data.bptt, precision)
        test = evaluate(self.model, self.corpus.test, data.eval_batch_size, data.bptt, precision)
        stopped = self._stop_reason() or "max_epochs"
        report = {
            "event": "final",
            "best_epoch": self.progress.best_epoch,
            "epochs": self.progress.epoch,
            "stopped_by": stopped,
            "valid_ppl": valid.perplexity,
            "test_ppl": test.perplexity,
            "eval_batch_size": data.eval_batch_size,
            "paper_valid_ppl": self.config.paper.valid,
            "paper_test_ppl": self.config.paper.test,
            "elapsed_s": self.progress.elapsed_s,
        }
        init_source = self.init_source or self._recorded_init_source()
        if init_source:
            report["init_from"] = init_source
        if self.world.main:
            write_text_atomic(self.run_dir / "final.json", json.dumps(report, indent=2) + "\n")
        self.world.barrier()
        return report
