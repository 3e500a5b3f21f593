"""The results of ``tiedlm reproduce TABLE`` as text and a plot: TABLE.md and TABLE.png.

Everything here renders the rows that tiedlm/reproduce.py collects from the run folders; it
reads no files itself.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any


def _collapse_repeats(items: list[str]) -> list[tuple[str, int]]:
    """Consecutive equal items as (item, how many): a run resumed twice the same way is one line."""
    return [(item, len(list(group))) for item, group in itertools.groupby(items)]


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tiedlm.plot import perplexity_axis

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, row in enumerate(rows):
        color, offset = f"C{index}", 0
        for stage in row.get("stage_rows", [row]):  # a later stage continues the curve of the one before
            epochs = [offset + point["epoch"] for point in stage["curve"]]
            label = f"{row['name']} valid" + (f", stage {stage['stage']}" if stage.get("stages", 1) > 1 else "")
            style = "-" if stage["stage"] == row.get("stages", 1) else "--"
            ax.plot(epochs, [p["valid_ppl"] for p in stage["curve"]], style, color=color, marker=".", label=label)
            offset = epochs[-1]
        if row["paper_valid"]:
            ax.axhline(row["paper_valid"], color=color, linestyle=":", linewidth=1)
    perplexity_axis(ax)
    ax.set_xlabel("epoch (a later stage's epochs follow the earlier one's)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{title}: validation perplexity (dotted: the paper's final value)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # one per writer: two lanes may write it at once
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _millions(count: int | None) -> str:
    return "—" if count is None else f"{count / 1e6:.2f}M"


def _delta(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None:
        return "—"
    return f"{ours - paper:+.1f}"


def ordering(rows: list[dict[str, Any]], key: str) -> str:
    """``REAL 82.7 < AL 82.9 < …``: the variants sorted by a perplexity column; ties (as shown) read ``=``."""
    present = [r for r in rows if r.get(key) is not None]
    present.sort(key=lambda r: r[key])
    text = ""
    for index, row in enumerate(present):
        shown = f"{row[key]:.1f}"
        if index:
            text += " = " if f"{present[index - 1][key]:.1f}" == shown else " < "
        text += f"{row['variant'].upper()} {shown}"
    return text


# The order the paper reports for PTB small (docs/method.md §7), checked for every row group:
# REAL ≤ AL < RE < VD, best first.
CLAIMED_ORDER = ("real", "al", "re", "vd")


def ordering_verdict(rows: list[dict[str, Any]], key: str) -> str:
    """Whether finished runs keep the claimed order REAL ≤ AL < RE < VD, pair by pair (missing variants skipped)."""
    by_variant = {r["variant"]: r[key] for r in rows if r.get(key) is not None and r["variant"] in CLAIMED_ORDER}
    present = [v for v in CLAIMED_ORDER if v in by_variant]
    if len(present) < 2:
        return "too few finished runs to check"
    broken = []
    for i, better in enumerate(present):
        for worse in present[i + 1 :]:
            allowed_tie = (better, worse) == ("real", "al")
            a, b = by_variant[better], by_variant[worse]
            if a > b or (a == b and not allowed_tie):
                broken.append(f"{worse.upper()} {b:.2f} ≤ {better.upper()} {a:.2f}")
    runs = ", ".join(v.upper() for v in present)
    if not broken:
        return f"holds ({runs})"
    return f"does not hold ({runs}): " + "; ".join(broken)


def fit_lines(rows: list[dict[str, Any]], window: int = 5) -> list[str]:
    """A table of where each run stands at its last epoch: the train/valid gap and the recent valid gain.

    A run whose valid perplexity still falls was stopped by its schedule, not by overfitting; a
    train perplexity (dropout on) close to valid says the model underfits rather than overfits.
    """
    lines = [
        "## Fit at the last epoch",
        "",
        "Train perplexity is measured during training, with dropout on. The gain is the mean fall",
        f"of valid perplexity per epoch over the last {window} epochs (> 0: still improving).",
        "",
        f"| variant | epoch | lr | train | valid | valid − train | valid gain per epoch (last {window}) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        curve = row["curve"]
        last = curve[-1]
        recent = curve[-(window + 1) :]
        gain = (recent[0]["valid_ppl"] - last["valid_ppl"]) / (len(recent) - 1) if len(recent) > 1 else None
        lr = "—" if last.get("lr") is None else f"{last['lr']:.3g}"
        lines.append(
            f"| {_stage_name(row)} | {last['epoch']} | {lr} | {last['train_ppl']:.1f} | {last['valid_ppl']:.1f} "
            f"| {last['valid_ppl'] - last['train_ppl']:+.1f} | {'—' if gain is None else f'{gain:+.2f}'} |"
        )
    return lines + [""]


def stretch_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Every stretch (one process: the start, or a resume) of every run: when it started, the epochs it
    ended, the machine, its CPU features, the precision and the commit."""
    lines = [
        "",
        "Stretches: each process that trained a run, its start or a resume (a stretch stopped mid-epoch",
        "ends no epoch; the next one finishes it):",
        "",
        "| run | stretch | started (UTC) | epochs ended | hardware | CPU features | precision | commit |",
        "|---|---:|---|---|---|---|---|---|",
    ]
    for row in rows:
        for number, stretch in enumerate(row.get("stretches", []), 1):
            started = (stretch["started"] or "?").replace("+00:00", "").replace("T", " ")[:16]
            commit = f"`{stretch['commit'][:8]}`" if stretch.get("commit") else "?"
            lines.append(
                f"| {_stage_name(row)} | {number} | {started} | {stretch['epochs'] or '—'} | {stretch['hardware']} "
                f"| {stretch.get('cpu_features') or 'not recorded'} | {stretch.get('precision') or '?'} | {commit} |"
            )
    return lines


def _stage_name(row: dict[str, Any]) -> str:
    return row["name"] + (f", stage {row['stage']}" if row.get("stages", 1) > 1 else "")


def stage_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A section with every training stage of the variants trained in stages (none: no section)."""
    staged = [row for row in rows if row.get("stages", 1) > 1]
    if not staged:
        return []
    lines = [
        "## Training stages",
        "",
        "The paper trained these cells in stages (its footnote 4; docs/method.md): each stage after the",
        "first starts from the best weights of the one before, with the schedule started again from the",
        "config's lr. The table above reports the last stage. Each stage stops by the config's rule:",
        "`train.max_epochs`, or `train.patience` epochs without a better validation perplexity.",
        "",
        "| variant | stage | valid | test | epochs (best) | wall | status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in staged:
        for stage in row["stage_rows"]:
            status = stage["status"] if stage["status"] != "finished" else f"stopped by {stage['stopped_by']}"
            lines.append(
                f"| {row['name']} | {stage['stage']} of {stage['stages']} | {_number(stage['valid'], 2)} "
                f"| {_number(stage['test'], 2)} | {stage['epochs']} ({stage['best_epoch']}) "
                f"| {stage['wall_s'] / 60:.0f} min | {status} |"
            )
        for missing in range(len(row["stage_rows"]) + 1, row["stages"] + 1):
            lines.append(f"| {row['name']} | {missing} of {row['stages']} | — | — | — | — | no epoch yet |")
    return lines + [""]


def render_markdown(
    table: str, rows: list[dict[str, Any]], command: str, paper: list[dict[str, Any]] | None = None
) -> str:
    """TABLE.md; ``paper`` (variant, paper_valid, paper_test) orders the paper's numbers for every variant."""
    paper = paper or rows
    corpus, size = table.rsplit("-", 1)  # ptb-small, wikitext-2-medium
    lines = [
        f"# {corpus} {size}: the paper's four variants, reproduced",
        "",
        f"Generated by `{command}` from the run logs in [`{table}/`]({table}/) (do not edit by hand;",
        f"the same numbers are in [`{table}.json`]({table}.json)). Paper: Inan, Khosravi, Socher (2017),",
        "Table 1 (docs/method.md §7). Valid/test are of the best-validation checkpoint, evaluated with the config's",
        "evaluation batch size; Δ = ours − paper.",
        "",
        "| variant | paper valid | paper test | valid | test | Δ valid | Δ test | params | epochs (best) "
        "| wall | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        status = row["status"] if row["status"] != "finished" else f"stopped by {row['stopped_by']}"
        if row["status"] != "finished":
            status += f" (best valid so far {row['best_valid_so_far']:.2f})"
        if row.get("stages", 1) > 1:
            status = f"stage {row['stage']} of {row['stages']}: {status}"
        if row.get("next_stage_waiting"):
            status = f"stage {row['stage']} of {row['stages']} finished; stage {row['stage'] + 1} has no epoch yet"
        lines.append(
            f"| {row['name']} | {_number(row['paper_valid'])} | {_number(row['paper_test'])} "
            f"| {_number(row['valid'], 2)} | {_number(row['test'], 2)} "
            f"| {_delta(row['valid'], row['paper_valid'])} | {_delta(row['test'], row['paper_test'])} "
            f"| {_millions(row['params'])} "
            f"| {row['epochs']} ({row['best_epoch']}) "
            f"| {row['wall_s'] / 60:.0f} min | {status} |"
        )
    finished = [r for r in rows if r["status"] == "finished"]
    lines += ["", "## Ordering", ""]
    lines.append(f"- paper, test: {ordering(paper, 'paper_test')}")
    lines.append(f"- ours, test: {ordering(finished, 'test') or '(no finished run yet)'}")
    lines.append(f"- paper, valid: {ordering(paper, 'paper_valid')}")
    lines.append(f"- ours, valid: {ordering(finished, 'valid') or '(no finished run yet)'}")
    lines.append(f"- the paper's claim REAL ≤ AL < RE < VD, ours on test: {ordering_verdict(finished, 'test')}")
    lines.append(f"- the paper's claim REAL ≤ AL < RE < VD, ours on valid: {ordering_verdict(finished, 'valid')}")
    stage_rows = [stage for row in rows for stage in row.get("stage_rows", [row])]
    lines += ["", f"![validation learning curves]({table}.png)", "", *stage_lines(rows)]
    lines += [*fit_lines(stage_rows), "## Runs", ""]
    lines += [
        "| variant | seed | precision | VD mode | hardware | commit | torch | log |",
        "|---|---:|---|---|---|---|---|---|",
    ]
    for row in stage_rows:
        commits = ", ".join(f"`{c[:8]}`" for c in row["commits"]) or "?"
        lines.append(
            f"| {_stage_name(row)} | {row['seed']} | {row['precision']} | {row['dropout_mode']} | {row['hardware']} "
            f"| {commits} | {row['torch']} | [{row['key']}.jsonl]({row['log']}) |"
        )
    lines += stretch_lines(stage_rows)
    drifted = [row for row in stage_rows if row.get("differs_from_config")]
    if drifted:
        lines += [
            "",
            "Settings in which a run differs from its config file as it reads now (its own `--set`,",
            "or the file edited after the run):",
            "",
        ]
        for row in drifted:
            changes = "; ".join(
                f"`{d['key']}` {d['run']!r} (run) vs {d['file']!r} (file)" for d in row["differs_from_config"]
            )
            lines.append(f"- {_stage_name(row)} (`{row['config']}`): {changes}")
    lines += ["", "Exact commands (each run alone; `tiedlm reproduce` issues the same ones):", ""]
    for row in stage_rows:
        lines.append(f"- {_stage_name(row)}: `{row['command']}`")
        for resumed, times in _collapse_repeats(row["resumed"]):
            lines.append(f"  - resumed{f' {times} times' if times > 1 else ''}: `{resumed}`")
        if row["status"] == "in progress":
            lines.append(
                f"  - in progress after {row['epochs']} of {row['max_epochs']} epochs: the command at the top of "
                "this file again resumes it from its last checkpoint (on a GPU, say)"
            )
        elif row["stopped_by"] == "time_limit" and row["epochs"] < row["max_epochs"]:
            lines.append(
                f"  - stopped by its time limit after {row['epochs']} of {row['max_epochs']} epochs; to go on "
                f"(on a GPU, say): `tiedlm train --resume {row['run_dir']} --set train.time_limit_minutes=0`, "
                "then the command at the top of this file again (it collects finished runs)"
            )
    lines.append("")
    return "\n".join(lines)
