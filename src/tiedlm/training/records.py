"""What a run writes about itself: run.json's records, the metrics line of an epoch (also to
TensorBoard, where it is installed and ``train.tensorboard`` is on), final.json.

The files and their place in the run folder: tiedlm/run_folder.py and docs/checkpoints.md.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tiedlm.config import Config
from tiedlm.cuda_graph import CapturedStep
from tiedlm.evaluate import perplexity
from tiedlm.runtime import provenance
from tiedlm.training.state import Progress


def tensorboard_writer(log_dir: Path):
    """A TensorBoard SummaryWriter when the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional `tensorboard` extra is not installed
        return None
    return SummaryWriter(log_dir=str(log_dir))


def add_scalars(writer, record: dict[str, Any]) -> None:
    """An epoch's metrics line as TensorBoard scalars at step ``epoch``."""
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(key, value, record["epoch"])
    writer.flush()


def model_size(model: torch.nn.Module, vocab_size: int) -> dict[str, int]:
    """Vocabulary size and trainable parameters (tied matrices once): what results tables show."""
    return {"vocab_size": vocab_size, "parameters": sum(p.numel() for p in model.parameters())}


def run_record(device: torch.device, precision: dict[str, str], corpus: dict[str, Any]) -> dict[str, Any]:
    """run.json of a fresh run: its provenance, device, precision, start time and corpus.

    ``precision``: the precision this stretch trains in, why, and how the training step runs."""
    return {
        **provenance(device),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **precision,
        "started": _now(),
        "corpus": corpus,
    }


def resume_record(source: Path, device: torch.device, precision: dict[str, str], epoch: int, corpus: str):
    """run.json's entry for one resume: from where, with what, from which (1-based) epoch on."""
    return {
        "from": str(source),
        **provenance(device),
        **precision,
        "from_epoch": epoch,
        "started": _now(),
        "corpus": corpus,
    }


def epoch_record(
    epoch: int, lr: float, stats: dict[str, float], valid_ppl: float, epoch_s: float, progress: Progress, step
) -> dict[str, Any]:
    """The metrics.jsonl line of one epoch; ``stats`` is what :meth:`Trainer.train_epoch` returned."""
    record = {
        "epoch": epoch,
        "lr": lr,
        "train_ppl": perplexity(stats["ce"]),
        "valid_ppl": valid_ppl,
        "best_valid_ppl": progress.best_valid_ppl,
        "train_tokens_per_s": stats["tokens"] / stats["s"] if stats["s"] > 0 else 0.0,
        "epoch_s": epoch_s,
        "elapsed_s": progress.elapsed_s,
        "skipped_steps": progress.skipped_steps,
    }
    if step.augmented is not None:
        record["train_kl"] = stats["kl"]
    if isinstance(step, CapturedStep):
        record["windows"] = step.counts()  # replayed from the CUDA graph, buffered, eager (so far)
    return record


def final_record(
    config: Config, progress: Progress, stopped_by: str, valid_ppl: float, test_ppl: float
) -> dict[str, Any]:
    """final.json: valid and test perplexity of best/, and how the run ended."""
    return {
        "event": "final",
        "best_epoch": progress.best_epoch,
        "epochs": progress.epoch,
        "stopped_by": stopped_by,
        "valid_ppl": valid_ppl,
        "test_ppl": test_ppl,
        "eval_batch_size": config.data.eval_batch_size,
        "paper_valid_ppl": config.paper.valid,
        "paper_test_ppl": config.paper.test,
        "elapsed_s": progress.elapsed_s,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
