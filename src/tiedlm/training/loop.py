"""The training loop (docs/method.md §6): SGD, the lr schedule, global-norm clipping,
early stopping on validation perplexity, and a checkpoint every epoch.

:class:`Trainer` trains one config into one run folder (tiedlm/run_folder.py,
docs/checkpoints.md): :meth:`Trainer.fit` runs epochs until the schedule ends, each epoch is
:meth:`Trainer.train_epoch` over the BPTT windows (each one a :class:`TrainingStep`), then
validation, a metrics line and a checkpoint. Faults (docs/faults.md) are handled by the named
calls of tiedlm/training/faults.py: a signal finishes the window, writes a checkpoint and ends
in :class:`Interrupted`; a run of non-finite steps ends the epoch in :class:`Rollback`.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from tqdm import tqdm

from tiedlm.checkpoint import (
    MODEL_FILE,
    Checkpoint,
    checkpoint_name,
    init_weights_from,
    link_checkpoint,
    remove_dir,
    remove_stale,
)
from tiedlm.checkpoint import (
    save_checkpoint as write_checkpoint_folder,
)
from tiedlm.config import Config
from tiedlm.cuda_graph import CapturedStep, plan_step
from tiedlm.data import batchify, bptt_windows, detach_state, load_corpus, num_windows
from tiedlm.distributed import World, check_batch
from tiedlm.errors import TiedlmError
from tiedlm.evaluate import evaluate, perplexity
from tiedlm.models import build_model
from tiedlm.precision import resolve_precision, warn_if_emulated
from tiedlm.run_folder import RunFolder
from tiedlm.runtime import frozen_heap, resolve_device
from tiedlm.training import faults, records
from tiedlm.training import resume as resuming
from tiedlm.training.faults import Interrupted, Rollback, RunLock, StopFlag, say
from tiedlm.training.records import tensorboard_writer
from tiedlm.training.state import EpochPosition, Progress, restore_trainer_state, trainer_state
from tiedlm.training.step import TrainingStep, learning_rate, make_optimizer


class Trainer:
    """Trains one configuration into one run folder.

    ``resume`` is a run folder (its newest intact checkpoint is used, damaged
    newer ones are skipped with a note) or one checkpoint folder. ``fault_hook``: see
    :attr:`TrainingStep.fault_hook` (docs/faults.md).
    """

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        *,
        resume: Path | None = None,
        echo=print,
        world: World | None = None,
        fault_hook=None,
    ):
        self.fault_hook = fault_hook
        self.run_dir, self.config = Path(run_dir), config
        self.folder = RunFolder(self.run_dir)
        self.world = world or World()
        self.echo = echo if self.world.main else (lambda *args, **kwargs: None)
        self.device = resolve_device(config.train.device)
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        self.precision, self.precision_reason = resolve_precision(config.train.precision, self.device)
        if self.world.main:
            warn_if_emulated(self.precision, self.device)
        check_batch(self.world, config.data.batch_size)
        self.stop = StopFlag()
        self.init_source: dict[str, Any] | None = None  # where train.init_from's weights came from
        self.position = EpochPosition()
        self.lock: RunLock | None = None
        self.tensorboard = None
        if self.world.main:  # only rank 0 owns (and writes) the run folder
            if resume is None and self.folder.holds_run():
                raise TiedlmError(
                    f"--out {self.run_dir}: already holds a run; continue it with --resume {self.run_dir} "
                    "or pick another --out"
                )
            faults.check_writable(self.run_dir)
            self.lock = RunLock(self.run_dir)
            if config.train.tensorboard:
                self.tensorboard = tensorboard_writer(self.run_dir / "tensorboard")
        self.stop.install()  # before anything is written
        try:
            self._setup(resume)
        except BaseException:
            self._release()
            raise

    @property
    def stop_signal(self) -> int | None:
        """The signal that asked training to stop (None: none has)."""
        return self.stop.signum

    @stop_signal.setter
    def stop_signal(self, signum: int | None) -> None:
        self.stop.signum = signum

    # --- set-up --------------------------------------------------------------------------------------------

    def _setup(self, resume: Path | None) -> None:
        config, world = self.config, self.world
        if world.main:
            for path in remove_stale(self.run_dir):
                say(f"removed {path}, left by an interrupted write")
        world.barrier()
        checkpoint = self._load_data_and_model(resume)
        config = self.config  # its data.corpus now the recorded location
        if world.main:
            faults.check_free_space(self.run_dir, self.model)
        masks = torch.Generator(device=self.device)
        masks.manual_seed(config.seed)  # the same on every rank (see distributed.py)
        self.model.use_masks(masks, world.batch_slice(config.data.batch_size))
        self.optimizer = make_optimizer(self.model, config.train)
        self.step = self._build_step()
        if checkpoint is not None:
            self._restore(checkpoint)
            if world.main:
                self.folder.truncate_metrics(self.progress.epoch)
                faults.repair_best(self.folder, self.progress.best_epoch)
                resumed = records.resume_record(
                    checkpoint.path, self.device, self.precision_info, self.progress.epoch + 1, config.data.corpus
                )
                self.folder.record_resume(resumed, self._model_size())
                say(f"resuming {self.run_dir} from {checkpoint.path}")
        else:
            self.progress = Progress()
            if world.main:
                info = records.run_record(self.device, self.precision_info, self.corpus_record)
                if self.init_source is not None:
                    info["init_from"] = self.init_source
                self.folder.write_run_info(info | self._model_size())
                self.folder.write_config(self.config.to_dict())
            self.save_checkpoint()  # epoch-0000: a good state to roll back to from the start
        world.barrier()

    def _load_data_and_model(self, resume: Path | None) -> Checkpoint | None:
        """Sets ``self.corpus``, ``self.model`` (from the checkpoint resumed, returned, else afresh),
        ``self.corpus_record``, ``self.init_source``, and ``self.config`` with the absolute ``data.corpus``."""
        config = self.config
        checkpoint = None
        if resume is not None:
            checkpoint = resuming.find_resume_checkpoint(Path(resume), self.device)
            resuming.check_resume_config(checkpoint.config, config)
            self.corpus = resuming.resume_corpus(checkpoint, config.data.corpus)
            self.model = checkpoint.model
        else:
            self.corpus = load_corpus(config.data.corpus)
        # Recorded as an absolute path, with its checksums, in config.json and every checkpoint.
        location = resuming.corpus_location(config.data.corpus)
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
        return checkpoint

    def _build_step(self) -> TrainingStep | CapturedStep:
        """The step, eager or a CUDA graph's replay (tiedlm/cuda_graph.py); also sets ``self.forward``
        (the model or its DDP wrapper) and ``self.precision_info`` (run.json's record of the precision)."""
        config, world = self.config, self.world
        self.forward: torch.nn.Module = self.model
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=device_ids)
        captured, step_info = plan_step(config, self.device, world)
        # What run.json records of this stretch: its precision, why, and how the training step runs.
        self.precision_info = {"precision": self.precision, "precision_reason": self.precision_reason}
        self.precision_info["training_step"] = step_info
        step = TrainingStep(
            self.model, self.optimizer, config, world, self.forward, self.precision, static_shapes=captured
        )
        step.fault_hook = self.fault_hook
        return CapturedStep(step, strict=config.train.cuda_graph == "on") if captured else step

    def _release(self) -> None:
        """Give back the signal handlers and the run lock."""
        self.stop.release()
        if self.lock is not None:
            self.lock.release()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    # --- training ------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train until max_epochs, early stopping or the time limit, then report best/ on valid and test."""
        with frozen_heap():  # the set-up stays out of the garbage collector's scans (tiedlm.runtime)
            try:
                while self._stop_reason() is None:
                    if self.stop.agreed(self.world, self.device):  # during set-up, validation or a checkpoint write
                        raise Interrupted(self.stop_signal, self.folder.checkpoints()[-1])
                    try:
                        self._run_epoch()
                    except Rollback:
                        self._rollback()
                report = self.final_report()
                if self.stop.agreed(self.world, self.device):  # during the final evaluation: the run is complete
                    raise Interrupted(self.stop_signal, self.folder.checkpoints()[-1])
                return report
            finally:
                self._release()

    def _run_epoch(self) -> None:
        """Train one epoch at its learning rate, validate, log the metrics line, write the checkpoint."""
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
        record = records.epoch_record(epoch, lr, stats, valid.perplexity, epoch_s, progress, self.step)
        self._log_metrics(record)  # before the checkpoint: a resume from epoch-1 drops this line
        self.save_checkpoint(improved=improved)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split (from ``self.position`` on); returns mean CE, KL, tokens and seconds."""
        config, model, world = self.config, self.model, self.world
        model.train()
        bptt = config.data.bptt
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
        tokens_per_window = bptt * batch_size * world.size
        bar = tqdm(
            total=windows * tokens_per_window, initial=start.window * tokens_per_window,
            desc=f"epoch {epoch}/{config.train.max_epochs}",
            unit="tok", unit_scale=True, disable=None if world.main else True, leave=False, dynamic_ncols=True,
        )  # fmt: skip
        for window, (inputs, targets) in enumerate(bptt_windows(source, bptt, start=start.window), start.window):
            if window == windows:
                break
            result = self.step(inputs, targets, state, stop=self.stop_signal is not None)
            if result.stop and self.stop_signal is None:  # another rank was signalled: stop together
                self.stop_signal = signal.SIGTERM
            if result.finite:
                state, bad_in_a_row = result.state, 0
                sums = [sums[0] + result.ce, sums[1] + result.kl, sums[2] + result.tokens]
            else:
                bad_in_a_row += 1
                state = self._after_nonfinite_step(epoch, window, bad_in_a_row, batch_size, bar)
            bar.update(targets.numel() * world.size)
            if window % 10 == 0 and sums[2]:
                bar.set_postfix(
                    ppl=f"{perplexity(sums[0] / sums[2]):.1f}", run_left=self._run_eta(epoch), refresh=False
                )
            # Under data parallelism only the ranks' agreement counts (result.stop), so that all
            # of them stop after the same window; one process also stops for a signal that
            # arrived during this step.
            if result.stop or (not world.distributed and self.stop_signal is not None):
                bar.close()
                position = EpochPosition(window + 1, detach_state(state), tuple(sums), time.perf_counter() - began)
                raise Interrupted(self.stop_signal, self.save_checkpoint(position))
        bar.close()
        self.position = EpochPosition()
        tokens = max(sums[2], 1.0)
        return {"ce": sums[0] / tokens, "kl": sums[1] / tokens, "tokens": sums[2], "s": time.perf_counter() - began}

    def _after_nonfinite_step(self, epoch: int, window: int, bad_in_a_row: int, batch_size: int, bar) -> tuple:
        """A non-finite step was not applied: count it, raise Rollback after too many in a row, and
        return a fresh (zero) recurrent state for the next window."""
        self.progress.skipped_steps += 1
        say(f"epoch {epoch} window {window}: non-finite loss or gradient, step skipped")
        if bad_in_a_row >= self.config.train.nonfinite_patience:
            bar.close()
            raise Rollback()
        return self.model.init_state(batch_size)  # a non-finite state would poison what follows

    def _run_eta(self, epoch: int) -> str:
        return self.progress.time_left(self.config.train, epoch)

    def _stop_reason(self) -> str | None:
        return self.progress.stop_reason(self.config.train)

    def final_report(self) -> dict[str, Any]:
        """Valid and test perplexity of best/, written to final.json."""
        if not self.folder.has_best():
            raise TiedlmError(f"{self.run_dir}: no epoch reached a finite validation perplexity (training diverged)")
        load_model(self.model, str(self.folder.best / MODEL_FILE), device=str(self.device))
        data = self.config.data
        valid = evaluate(self.model, self.corpus.valid, data.eval_batch_size, data.bptt, self.precision)
        test = evaluate(self.model, self.corpus.test, data.eval_batch_size, data.bptt, self.precision)
        report = records.final_record(
            self.config, self.progress, self._stop_reason() or "max_epochs", valid.perplexity, test.perplexity
        )
        init_source = self.init_source or self.folder.recorded("init_from")
        if init_source:
            report["init_from"] = init_source
        if self.world.main:
            self.folder.write_final(report)
        self.world.barrier()
        return report

    # --- checkpoints, resume and rollback ------------------------------------------------------------------

    def save_checkpoint(self, position: EpochPosition | None = None, improved: bool = False) -> Path:
        """Write the checkpoint at the current position, update best/, keep the last two.

        Every rank calls it (the recurrent state is gathered from all of them); rank 0 writes."""
        window = position.window if position else 0
        state = self.world.gather_state(position.state) if position is not None and window else None
        folder = self.folder.checkpoints_dir / checkpoint_name(self.progress.epoch, window)
        if self.world.main:
            plain, tensors = trainer_state(
                self.progress, self.optimizer, self.model, self.corpus_record, position, state
            )
            write_checkpoint_folder(folder, self.model, self.config, self.corpus.vocab, plain, tensors)
            if improved:
                link_checkpoint(folder, self.folder.best)
            for old in self.folder.checkpoints()[: -faults.KEEP_CHECKPOINTS]:
                remove_dir(old)
        self.world.barrier()
        return folder

    def _restore(self, checkpoint: Checkpoint, lr_scale: float | None = None) -> None:
        """Load the weights, optimizer, counters, RNG and data position of a training checkpoint."""
        try:
            self.progress, self.position = restore_trainer_state(
                checkpoint.trainer_state, checkpoint.trainer_tensors, self.optimizer, self.model,
                self.world.local_state, self.device,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise TiedlmError(f"--resume: the trainer state in {checkpoint.path} is incomplete") from None
        if lr_scale is not None:
            self.progress.lr_scale = lr_scale
        if checkpoint.model is not self.model:
            self.model.load_state_dict(checkpoint.model.state_dict())

    def _rollback(self) -> None:
        """Restore the last good checkpoint with the learning rate halved (after non-finite steps)."""
        faults.check_rollbacks_left(self.run_dir, self.progress.rollbacks)
        lr_scale, rollbacks = self.progress.lr_scale / 2, self.progress.rollbacks + 1
        skipped = self.progress.skipped_steps
        checkpoint = resuming.latest_good(self.run_dir, self.device)
        self._restore(checkpoint, lr_scale=lr_scale)
        self.progress.rollbacks, self.progress.skipped_steps = rollbacks, skipped
        if self.world.main:
            self.folder.truncate_metrics(self.progress.epoch)
        say(
            f"{self.config.train.nonfinite_patience} non-finite steps in a row: restored {checkpoint.path} "
            f"and halved the learning rate (scale {lr_scale:g})"
        )

    # --- the run folder's records --------------------------------------------------------------------------

    def _log_metrics(self, record: dict[str, Any]) -> None:
        if self.world.main and self.tensorboard is not None:
            records.add_scalars(self.tensorboard, record)
        if self.world.main:
            self.echo(self.folder.append_metrics(record))

    def _model_size(self) -> dict[str, int]:
        return records.model_size(self.model, len(self.corpus.vocab))
