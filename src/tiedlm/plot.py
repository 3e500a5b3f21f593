"""`tiedlm plot`: training and validation perplexity of one or more runs, against epochs and wall time."""

from __future__ import annotations

import os
from pathlib import Path

from tiedlm.errors import TiedlmError
from tiedlm.run_folder import RunFolder


def read_run_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch records of RUN/metrics.jsonl; a one-line error if there are none."""
    folder = RunFolder(run_dir)
    if not folder.metrics.is_file():
        raise TiedlmError(f"{run_dir}: not a run folder (no metrics.jsonl)")
    records = folder.epochs()
    if not records:
        raise TiedlmError(f"{folder.metrics}: no finished epoch yet")
    return records


def perplexity_axis(ax, epochs: bool = True) -> None:
    """A log perplexity axis labelled in plain numbers (120, not 1.2×10²); whole epochs on x."""
    from matplotlib.ticker import LogFormatter, MaxNLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    if epochs:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Write a PNG of the runs' metrics.jsonl (see ``plot_curves``)."""
    runs = [(Path(d), read_run_metrics(Path(d))) for d in run_dirs]
    labels = labels or [d.name if d.name not in ("", ".") else str(d) for d, _ in runs]
    return plot_curves([(label, records) for label, (_, records) in zip(labels, runs, strict=True)], out)


def plot_curves(series: list[tuple[str, list[dict]]], out: Path) -> Path:
    """Write a PNG atomically: perplexity against epoch (left) and wall time (right); solid valid, dashed train.

    ``series`` is (label, per-epoch records with epoch, elapsed_s, valid_ppl and train_ppl) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for index, (label, records) in enumerate(series):
        color = f"C{index % 10}"
        epochs = [r["epoch"] for r in records]
        minutes = [r["elapsed_s"] / 60 for r in records]
        valid = [r["valid_ppl"] for r in records]
        train = [r["train_ppl"] for r in records]
        for ax, xs in ((by_epoch, epochs), (by_time, minutes)):
            ax.plot(xs, valid, color=color, marker=".", label=f"{label} valid")
            ax.plot(xs, train, color=color, linestyle="--", alpha=0.6, label=f"{label} train")
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("wall time (minutes, training + validation)")
    by_epoch.set_ylabel("perplexity")
    perplexity_axis(by_epoch)
    perplexity_axis(by_time, epochs=False)
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3, which="both")
    by_time.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out
