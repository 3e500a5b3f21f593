"""``tiedlm reproduce TABLE``: train (or collect) the four variants of one row group of the paper.

A table such as ``ptb-small`` names the configs ``configs/ptb/small-{vd,al,re,real}.toml``.
Each variant trains in its own run folder, ``RUNS/ptb-small/VARIANT``, as a
``tiedlm train`` subprocess (several at once with ``--jobs``, threads split
between them); a finished run (one with ``final.json``) is collected, not re-run,
and an interrupted one is resumed. The results are written from the run folders'
logs alone:

    results/ptb-small.md     paper valid/test beside ours, parameters, epochs, wall time,
                             hardware, seed, commit and the exact command of each run
    results/ptb-small.json   the same as a list of objects, one per variant
    results/ptb-small.png    validation learning curves
    results/ptb-small/       each run's metrics.jsonl, run.json and final.json (the logs the
                             tables come from; checkpoints stay in the run folders)

The runs are trained by the experiment scheduler (tiedlm/experiments.py); the markdown and
the plot are rendered by tiedlm/results_table.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiedlm.errors import TiedlmError
from tiedlm.experiments import Job, run_jobs
from tiedlm.results_table import plot_curves, render_markdown
from tiedlm.run_folder import InRunFolder, current_final, read_epochs, read_json
from tiedlm.stretches import hardware_text, precision_text, stretch_rows

VARIANTS = ("vd", "al", "re", "real")
VARIANT_NAMES = {"vd": "VD", "al": "VD + AL", "re": "VD + RE", "real": "VD + RE + AL (REAL)"}
TABLES = {
    "ptb-small": ("ptb", "small"),
    "ptb-medium": ("ptb", "medium"),
    "ptb-large": ("ptb", "large"),
    "wikitext-2-small": ("wikitext-2", "small"),
    "wikitext-2-medium": ("wikitext-2", "medium"),
}


class NothingToCollect(TiedlmError):
    """No run of the table has finished an epoch, so there is no row to write."""


@dataclass
class Plan(InRunFolder):
    """Where one training stage of one variant has its config, run folder and collected logs.

    Most tables train each variant once. Where the config's ``paper.stages`` says the paper
    trained a cell in stages (PTB small: 2), stage k > 1 is the same config started from stage
    k-1's best weights (``train.init_from``) with a fresh schedule, in ``RUNS/TABLE/VARIANT-stageK``.
    """

    table: str
    variant: str
    config: Path
    run_dir: Path
    stage: int = 1
    stages: int = 1
    previous: Plan | None = None  # the stage this one starts from

    @property
    def key(self) -> str:
        """``real`` for stage 1, ``real-stage2`` after it: the name of its run folder and logs."""
        return self.variant if self.stage == 1 else f"{self.variant}-stage{self.stage}"

    @property
    def ready(self) -> bool:
        """Whether it can train now: the stage it starts from has finished."""
        return self.previous is None or self.previous.finished


def plan(table: str, variants: list[str], configs: Path, runs: Path, overrides: list[str] = ()) -> list[Plan]:
    """The stages to train, variant by variant, stage 1 first; every stage after the first needs the one before.

    The number of stages is the config's ``paper.stages`` after ``overrides`` (``--set paper.stages=3``:
    a third stage, from the second's best weights)."""
    from tiedlm.config import load_config

    if table not in TABLES:
        raise TiedlmError(f"reproduce: unknown table {table!r} (choose from {', '.join(TABLES)})")
    corpus, size = TABLES[table]
    plans = []
    for variant in variants:
        if variant not in VARIANTS:
            raise TiedlmError(f"--variants: unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
        config = configs / corpus / f"{size}-{variant}.toml"
        if not config.is_file():
            raise TiedlmError(f"{config}: no such config (give --configs, the folder holding ptb/ and wikitext-2/)")
        stages = load_config(config, overrides).paper.stages
        previous = None
        for stage in range(1, stages + 1):
            name = variant if stage == 1 else f"{variant}-stage{stage}"
            previous = Plan(table, variant, config, runs / table / name, stage, stages, previous)
            plans.append(previous)
    return plans


def configs_folder(given: str | None) -> Path:
    """--configs, else ./configs (a checkout), else the configs installed with the package."""
    if given is not None:
        return Path(given)
    if Path("configs").is_dir():
        return Path("configs")
    from importlib import resources

    return Path(str(resources.files("tiedlm") / "configs"))


def check_overrides(plans: list[Plan], overrides: list[str]) -> None:
    """Check the ``--set`` overrides against every plan's config (a one-line error for a bad one)."""
    from tiedlm.config import load_config

    for item in plans:
        load_config(item.config, overrides)


def reproduce_command(table: str, variants: list[str], overrides: list[str], runs: str, results: str) -> str:
    """The ``tiedlm reproduce`` command that regenerates a table, as TABLE.md records it."""
    command = f"tiedlm reproduce {table}"
    if variants != list(VARIANTS):
        command += f" --variants {','.join(variants)}"
    command += "".join(f" --set {text}" for text in overrides)
    for option, value, default in (("--runs", runs, "runs"), ("--results", results, "results")):
        if value != default:  # where the results came from and go: part of the command to re-run
            command += f" {option} {value}"
    return command


def job(item: Plan, overrides: list[str], after: Job | None = None) -> Job:
    """One stage as a job of the scheduler (tiedlm/experiments.py); a later stage starts from the
    best weights of the one before (``train.init_from``)."""
    start = [f"train.init_from={item.previous.run_dir}"] if item.previous is not None else []
    return Job(f"{item.table}/{item.key}", item.config, item.run_dir, list(overrides), start, after)


def train_command(item: Plan, overrides: list[str]) -> list[str]:
    """The ``tiedlm train`` call for one stage: a fresh run, or the continuation of an interrupted one."""
    return job(item, overrides).command()


def set_aside(run_dir: Path) -> Path:
    """Move a run folder out of the way (never delete a finished run): RUN.replaced-YYYYmmdd-HHMMSS."""
    target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(target)
    return target


def train_all(
    plans: list[Plan], overrides: list[str], jobs: int, say=print, python: str = sys.executable
) -> int | None:
    """Train the plans' unfinished runs, ``jobs`` at a time (tiedlm/experiments.py's :func:`run_jobs`).

    Returns None when all finished, 128 + signal if stopped by one, 1 if a trainer failed.

    SIGINT/SIGTERM are passed on to the running trainers, which write a checkpoint and exit;
    the next ``tiedlm reproduce`` resumes them.
    """
    scheduled: dict[int, Job] = {}
    for item in plans:
        after = scheduled.get(id(item.previous)) if item.previous is not None else None
        scheduled[id(item)] = job(item, overrides, after)
    todo = list(scheduled.values())
    return run_jobs(todo, jobs, say, python, name="reproduce", again="`tiedlm reproduce` again")


# --- collecting results ---------------------------------------------------------------------------------------


def count_parameters(config: dict[str, Any], vocab_size: int) -> int:
    """Trainable parameters of the model a run's config.json describes (tied matrices counted once)."""
    from tiedlm.config import config_from_dict
    from tiedlm.models import build_model

    model = build_model(config_from_dict(config, "config.json").model, vocab_size)
    return sum(p.numel() for p in model.parameters())


def _command_text(argv: list[str]) -> str:
    return " ".join(["tiedlm", *argv[1:]])


# Settings that do not change what a run learns (a resumed run may also change them).
NOT_TRAINING = (
    "name", "paper.", "train.time_limit_minutes", "train.device", "train.tensorboard", "train.cuda_graph",
)  # fmt: skip


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def config_drift(run_config: dict[str, Any], config_file: Path) -> list[dict[str, Any]]:
    """The settings in which a run differs from its config file as it reads now.

    A run's own ``--set`` shows up here as well as a config file edited after the run (a
    setting the run's config.json lacks is read at today's default, as its code had no other).
    """
    from tiedlm.config import config_from_dict, load_config

    ran = _flat(config_from_dict(run_config, "run config.json").to_dict())
    now = _flat(load_config(config_file).to_dict())
    return [
        {"key": key, "run": ran[key], "file": now[key]}
        for key in ran
        if ran[key] != now.get(key) and not key.startswith(NOT_TRAINING)
    ]


def run_files(item: Plan, results: Path) -> dict[str, Path] | None:
    """Where a stage's logs are: its run folder, or (a fresh clone) the copies in ``results/TABLE/``."""
    folder = item.folder
    in_run = {"metrics": folder.metrics, "run": folder.run_info, "final": folder.final, "config": folder.config}
    if in_run["metrics"].is_file():
        return in_run
    logs = results / item.table
    copied = {
        "metrics": logs / f"{item.key}.jsonl",
        "run": logs / f"{item.key}.run.json",
        "final": logs / f"{item.key}.final.json",
        "config": logs / f"{item.key}.config.json",
    }
    return copied if copied["metrics"].is_file() and copied["config"].is_file() else None


def _parameters(item: Plan, info: dict[str, Any], config: dict[str, Any]) -> int | None:
    if "parameters" in info:
        return info["parameters"]
    vocab = item.folder.best / "vocab.txt"
    return count_parameters(config, item.folder.vocab_size()) if vocab.is_file() else None


def collect_run(item: Plan, files: dict[str, Path]) -> dict[str, Any] | None:
    """One stage's row of the results: finished, or in progress (``status`` says which)."""
    config = read_json(files["config"])
    info = read_json(files["run"])
    metrics = read_epochs(files["metrics"])
    if not metrics:
        return None
    final = current_final(files["final"], metrics)  # None if resumed after it ended: out of date
    paper = config.get("paper", {})
    stretches = [info, *info.get("resumed", [])]
    row = {
        "table": item.table,
        "variant": item.variant,
        "key": item.key,
        "stage": item.stage,
        "stages": item.stages,
        "name": VARIANT_NAMES[item.variant],
        "status": "finished" if final else "in progress",
        "valid": final["valid_ppl"] if final else None,
        "test": final["test_ppl"] if final else None,
        "best_valid_so_far": min(m["valid_ppl"] for m in metrics),
        "paper_valid": paper.get("valid"),
        "paper_test": paper.get("test"),
        "params": _parameters(item, info, config),
        "epochs": metrics[-1]["epoch"],
        "best_epoch": final["best_epoch"] if final else min(metrics, key=lambda m: m["valid_ppl"])["epoch"],
        "stopped_by": final["stopped_by"] if final else None,
        "wall_s": metrics[-1]["elapsed_s"],
        "hardware": hardware_text(info),
        "precision": precision_text(info, config),
        "dropout_mode": config["model"]["dropout_mode"],
        "seed": config["seed"],
        "commit": info.get("commit"),
        "commits": list(dict.fromkeys(c.get("commit") for c in stretches if c.get("commit"))),  # in order of use
        "command": _command_text(info["command"]),
        "resumed": [_command_text(r["command"]) for r in info.get("resumed", [])],
        "stretches": stretch_rows(info, config, metrics[-1]["epoch"]),
        "init_from": (info.get("init_from") or {}).get("checkpoint"),
        "torch": info.get("torch"),
        "curve": [
            {"epoch": m["epoch"], "lr": m.get("lr"), "train_ppl": m["train_ppl"], "valid_ppl": m["valid_ppl"]}
            for m in metrics
        ],
        "log": f"{item.table}/{item.key}.jsonl",
        "config": str(item.config),
        "run_dir": str(item.run_dir),
        "max_epochs": config["train"]["max_epochs"],
        "differs_from_config": [
            d for d in config_drift(config, item.config) if d["key"] != "train.init_from" or item.stage == 1
        ],
    }
    return row


def report_rows(stage_rows: list[dict[str, Any]], plans: list[Plan]) -> list[dict[str, Any]]:
    """One row per variant: its last stage (the paper's cell), with the earlier stages' numbers beside it.

    While the last stage has no epoch yet, the variant's row is in progress with no valid/test:
    an earlier stage's numbers are not the cell the paper reports.
    """
    rows = []
    for variant in dict.fromkeys(item.variant for item in plans):
        stages = [row for row in stage_rows if row["variant"] == variant]
        if not stages:
            continue
        last = next(item for item in reversed(plans) if item.variant == variant)
        row = dict(stages[-1])
        complete = row["stage"] == last.stage
        if not complete:
            # the next stage is waiting for its first epoch when this one has finished
            row["next_stage_waiting"] = row["status"] == "finished"
            row.update(status="in progress", valid=None, test=None, stopped_by=None)
        for earlier in stages[:-1] if complete else stages:
            n = earlier["stage"]
            row[f"stage{n}_valid"], row[f"stage{n}_test"] = earlier["valid"], earlier["test"]
            row[f"stage{n}_epochs"], row[f"stage{n}_status"] = earlier["epochs"], earlier["status"]
        row["stage_rows"] = stages
        rows.append(row)
    return rows


def collect(plans: list[Plan], results: Path, command: str) -> list[dict[str, Any]]:
    """Copy the runs' logs into ``results/TABLE/`` and write TABLE.json, TABLE.md and TABLE.png."""
    table = plans[0].table
    stage_rows = []
    logs = results / table
    for item in plans:
        files = run_files(item, results)
        row = collect_run(item, files) if files else None
        if row is None:
            continue
        if files["metrics"].parent == item.run_dir:
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files["metrics"], logs / f"{item.key}.jsonl")
            shutil.copyfile(files["run"], logs / f"{item.key}.run.json")
            shutil.copyfile(files["config"], logs / f"{item.key}.config.json")
            if row["status"] == "finished":
                shutil.copyfile(files["final"], logs / f"{item.key}.final.json")
        stage_rows.append(row)
    if not stage_rows:
        where = ", ".join(str(item.run_dir) for item in plans)
        raise NothingToCollect(f"reproduce {table}: no run has finished an epoch yet ({where})")
    rows = report_rows(stage_rows, plans)
    _write_text(results / f"{table}.json", json.dumps(rows, indent=2) + "\n")
    plot_curves(rows, results / f"{table}.png", title=table)
    paper = [_paper_numbers(item) for item in plans if item.stage == 1]
    _write_text(results / f"{table}.md", render_markdown(table, rows, command, paper))
    return rows


def _paper_numbers(item: Plan) -> dict[str, Any]:
    """The published perplexities of a variant, from its config (whether or not it has a run yet)."""
    from tiedlm.config import load_config

    paper = load_config(item.config).paper
    return {"variant": item.variant, "paper_valid": paper.valid, "paper_test": paper.test}


def _write_text(path: Path, text: str) -> None:
    from tiedlm.checkpoint import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
