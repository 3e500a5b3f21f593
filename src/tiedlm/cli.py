"""The ``tiedlm`` command: parses arguments and calls the library.

Every user error ends as one line on stderr, ``tiedlm: error: …``, and exit
code 2; nothing already written is overwritten. Options that the library checks
(``generate``'s and ``score``'s) are passed to it as they are, and its
:class:`~tiedlm.errors.InvalidArgument` is reported under the option's name, so
the command line and the Python API refuse the same values with the same words.

Longer than 400 lines because the argument parser of every command is here, one line per
option; each command's handler only calls the library and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

from tiedlm import __version__
from tiedlm.errors import DiskFull, InvalidArgument, TiedlmError
from tiedlm.runtime import tune_allocator


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        command = self.prog.partition(" ")[2]
        raise TiedlmError(f"{command}: {message}" if command else message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, got {text!r}")
    return value


STOP_AFTER_HELP = (
    "after this many minutes of wall time, stop as SIGTERM does: finish the window, write a checkpoint, "
    "exit 143 (resume later; for machines whose sessions end)"
)


@contextlib.contextmanager
def _stop_after(minutes: float | None):
    """``--stop-after``: SIGTERM this process after ``minutes``; the trainers' handlers make that a clean stop.

    Unlike ``train.time_limit_minutes`` (a budget of training time that ends the run with final.json),
    this ends one stretch of it, mid-epoch, and the run resumes where it stopped."""
    if minutes is None:
        yield
        return

    def stop() -> None:
        print(f"tiedlm: --stop-after {minutes:g}: {minutes:g} minutes are up, stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Timer(minutes * 60, stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@contextlib.contextmanager
def _as_options(**options: str):
    """Report the library's InvalidArgument for argument NAME as one for the option ``options[NAME]``."""
    try:
        yield
    except InvalidArgument as exc:
        if exc.name in options:
            raise exc.renamed(options[exc.name]) from None
        raise


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tiedlm", description="Language models with tied embeddings and the augmented loss.")
    parser.add_argument("--version", action="version", version=f"tiedlm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model from a TOML config")
    train.add_argument("config", nargs="?", help="TOML config (optional with --resume: the checkpoint's is used)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.max_epochs=3 (repeatable)",
    )
    train.add_argument("--out", help="run folder (default: runs/<config name>)")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR (or from checkpoint folder DIR)")
    train.add_argument("--stop-after", type=_minutes, metavar="MINUTES", help=STOP_AFTER_HELP)

    evaluate = commands.add_parser("eval", help="perplexity of a checkpoint on a split")
    evaluate.add_argument("checkpoint", help="checkpoint folder, or a run folder (uses its best/)")
    evaluate.add_argument("--split", choices=("valid", "test"), default="valid")
    evaluate.add_argument("--batch-size", type=_positive_int, help="default: the config's eval_batch_size")
    evaluate.add_argument("--data", help="corpus to evaluate on (default: the one it was trained on)")
    evaluate.add_argument(
        "--precision", choices=("fp32", "bf16", "auto"), help="default: the precision it was trained in"
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    generate = commands.add_parser("generate", help="sample text after a prompt")
    generate.add_argument("checkpoint")
    generate.add_argument("--prompt", default="", help="words to continue (out-of-vocabulary words become <unk>)")
    # Checked by tiedlm.generate (tiedlm.validate.generation), as in the Python API.
    generate.add_argument("--words", type=int, default=50, help="words to generate (≥ 1)")
    generate.add_argument("--temperature", type=float, default=1.0, help="finite, ≥ 0; 0 = always the most likely word")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely words (0 = all)")
    generate.add_argument("--seed", type=int, default=None, help="an integer in [-2**63, 2**64 - 1]")

    score = commands.add_parser("score", help="log-probability and perplexity of each line of a file")
    score.add_argument("checkpoint")
    score.add_argument("file", help="text file, or - for standard input")
    score.add_argument("--batch-size", type=int, default=32, help="lines scored together (≥ 1)")
    bench = commands.add_parser("bench", help="training/evaluation speed of a config vs a naive reference")
    bench.add_argument("config")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--windows", type=_positive_int, default=20, help="timed BPTT windows (median is reported)")
    bench.add_argument("--warmup", type=_positive_int, default=3)
    bench.add_argument("--no-reference", action="store_true", help="skip the naive reference")
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    reproduce = commands.add_parser("reproduce", help="train or collect the four variants of a paper table")
    reproduce.add_argument("table", help="ptb-small, ptb-medium, ptb-large, wikitext-2-small or wikitext-2-medium")
    reproduce.add_argument("--variants", default="vd,al,re,real", help="comma-separated subset of vd,al,re,real")
    reproduce.add_argument(
        "--configs", help="folder holding ptb/ and wikitext-2/ configs (default: ./configs, else the packaged ones)"
    )
    reproduce.add_argument("--runs", default="runs", help="run folders go to RUNS/TABLE/VARIANT")
    reproduce.add_argument("--results", default="results", help="where TABLE.md, .json, .png and the logs go")
    reproduce.add_argument("--jobs", type=_positive_int, default=1, help="variants trained at once (threads split)")
    reproduce.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="config override for every variant, e.g. --set train.precision=bf16")  # fmt: skip
    reproduce.add_argument("--rerun", action="store_true", help="train again even where a run finished")
    reproduce.add_argument("--collect-only", action="store_true", help="train nothing; write the results")
    reproduce.add_argument("--stop-after", type=_minutes, metavar="MINUTES", help=STOP_AFTER_HELP)

    data = commands.add_parser("data", help="corpora: fetch the ones too large to bundle")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    fetch = data_commands.add_parser("fetch", help="download, verify and unpack a corpus into the data cache")
    fetch.add_argument("name", help="wikitext-103")
    fetch.add_argument("--url", help="download from this mirror instead of the canonical address")
    fetch.add_argument("--sha256", help="expected SHA-256 of the archive (with --url)")
    fetch.add_argument("--cache", help="data cache (default $TIEDLM_DATA or ~/.cache/tiedlm)")
    fetch.add_argument("--retries", type=int, default=5, help="reconnections when the download drops")

    plot = commands.add_parser("plot", help="PNG of train/valid perplexity against epochs and wall time")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default="runs.png", help="PNG to write (default runs.png)")
    plot.add_argument("--labels", help="comma-separated legend labels, one per run (default: folder names)")

    analyze = commands.add_parser("analyze", help="the paper's analyses: subspace, predictions, neighbours")
    analyses = analyze.add_subparsers(dest="analysis", required=True, parser_class=_Parser)
    subspace = analyses.add_parser("subspace", help="distance of W from span(L) under β·τ²|V|·J_aug + (1−β)·J")
    subspace.add_argument("--betas", type=_float_list, help="β sweep at --beta-sweep-tau (default 0,0.1,…,1)")
    subspace.add_argument("--taus", type=_float_list, help="τ sweep at β = 1 (default 1,2,5,10,20)")
    subspace.add_argument("--seeds", type=_int_list, help="seeds averaged over (default 1,2,3)")
    subspace.add_argument("--epochs", type=_positive_int, help="epochs per run (default 10)")
    subspace.add_argument("--words", type=_positive_int, help="length of the PTB train slice (default 20000)")
    subspace.add_argument("--no-detach-target", action="store_true", help="let the AL target train L too")
    subspace.add_argument("--jobs", type=_positive_int, default=2, help="runs at once, one thread each (default 2)")
    subspace.add_argument("--out", default="results", help="folder for subspace.{csv,png,md} (default results)")

    predictions = analyses.add_parser("predictions", help="top next words of two checkpoints, side by side")
    predictions.add_argument("checkpoint_a")
    predictions.add_argument("checkpoint_b")
    predictions.add_argument("--context", action="append", default=[], help="words before the blank (repeatable)")
    predictions.add_argument("-k", type=_positive_int, default=10, help="words shown per model (default 10)")
    predictions.add_argument("--report", help="also measure the whole split and write this markdown file")
    predictions.add_argument("--split", choices=("valid", "test"), default="test")
    predictions.add_argument("--examples", type=int, default=6, help="random split positions in the report")
    predictions.add_argument("--seed", type=int, default=1, help="picks the report's example positions")

    neighbours = analyses.add_parser("neighbours", help="nearest words by cosine in a checkpoint's embedding")
    neighbours.add_argument("checkpoint")
    neighbours.add_argument("word")
    neighbours.add_argument("-k", type=_positive_int, default=10)
    return parser


def _number_list(cast, kind: str):
    def parse(text: str) -> list:
        try:
            values = [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}")
        return values

    return parse


_float_list = _number_list(float, "numbers")
_int_list = _number_list(int, "integers")


def _device(name: str = "auto"):
    from tiedlm.runtime import resolve_device

    return resolve_device(name)


def _cmd_train(args) -> int:
    from tiedlm.distributed import leave_world, world_from_env

    world = world_from_env()
    try:
        with _stop_after(args.stop_after):
            return _train(args, world)
    finally:
        leave_world(world)


def _train(args, world) -> int:
    import torch

    from tiedlm.distributed import init_world
    from tiedlm.runtime import resolve_device
    from tiedlm.training import Interrupted, Trainer, resolve_run

    config, run_dir = resolve_run(args.config, args.overrides, args.out, args.resume)
    device = resolve_device(config.train.device)
    init_world(world, torch.device("cuda", world.local_rank) if device.type == "cuda" else device)
    try:
        resume = Path(args.resume) if args.resume is not None else None
        trainer = Trainer(config, run_dir, resume=resume, world=world)
        report = trainer.fit()
    except Interrupted as stop:
        if world.main:
            print(f"tiedlm: {stop}; continue with: tiedlm train --resume {run_dir}", file=sys.stderr)
        return stop.exit_code
    except DiskFull as exc:
        from tiedlm.checkpoint import run_checkpoints

        then = f"continue with: tiedlm train --resume {run_dir}" if run_checkpoints(run_dir) else "start it again"
        raise DiskFull(f"{exc}; free some space, then {then}") from None
    if not world.main:
        return 0
    print(json.dumps(report))
    print(
        f"best epoch {report['best_epoch']}: valid perplexity {report['valid_ppl']:.2f}, "
        f"test perplexity {report['test_ppl']:.2f}  ({run_dir})"
    )
    return 0


def _cmd_eval(args) -> None:
    from tiedlm.evaluate import evaluate_checkpoint

    record = evaluate_checkpoint(args.checkpoint, args.split, args.batch_size, args.data, args.precision)
    if args.json:
        print(json.dumps(record))
    else:
        print(
            f"{args.split} perplexity {record['perplexity']:.2f} ({record['tokens']} tokens, "
            f"batch size {record['batch_size']})"
        )


def _cmd_generate(args) -> None:
    from tiedlm.checkpoint import load_checkpoint
    from tiedlm.generate import format_words, generate

    checkpoint = load_checkpoint(args.checkpoint, _device())
    with _as_options(words="--words", temperature="--temperature", top_k="--top-k", seed="--seed", prompt="--prompt"):
        words, unknown = generate(
            checkpoint.model, checkpoint.vocab, args.prompt, args.words, args.temperature, args.top_k, args.seed
        )
    if unknown:
        print(f"tiedlm: warning: --prompt: not in the vocabulary, read as <unk>: {' '.join(unknown)}", file=sys.stderr)
    print(format_words(args.prompt.split() + words))


def _read_lines(name: str) -> list[str]:
    if name == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(name).read_bytes()
        except FileNotFoundError:
            raise TiedlmError(f"{name}: no such file") from None
        except OSError as exc:
            raise TiedlmError(f"{name}: cannot read ({exc.strerror})") from None
    where = "standard input" if name == "-" else name
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TiedlmError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise TiedlmError(f"{where}: no lines to score")
    return lines


def _cmd_score(args) -> None:
    import math

    from tiedlm.checkpoint import load_checkpoint
    from tiedlm.generate import score_lines

    checkpoint = load_checkpoint(args.checkpoint, _device())
    lines = _read_lines(args.file)
    where = "standard input" if args.file == "-" else args.file
    with _as_options(batch_size="--batch-size"):
        scores = score_lines(checkpoint.model, checkpoint.vocab, lines, args.batch_size, where)
    print("# line\tlogprob_nats\ttokens\tperplexity")
    for number, score in enumerate(scores, 1):
        print(f"{number}\t{score.logprob:.4f}\t{score.tokens}\t{score.perplexity:.2f}")
    logprob, tokens = sum(s.logprob for s in scores), sum(s.tokens for s in scores)
    print(f"total\t{logprob:.4f}\t{tokens}\t{math.exp(-logprob / tokens):.2f}")


def _cmd_bench(args) -> None:
    from tiedlm.bench import bench, format_report
    from tiedlm.config import load_config

    config = load_config(args.config, args.overrides)
    report = bench(config, args.windows, args.warmup, reference=not args.no_reference)
    print(json.dumps(report) if args.json else format_report(report))


def _cmd_reproduce(args) -> int:
    from tiedlm.reproduce import (
        NothingToCollect,
        check_overrides,
        collect,
        configs_folder,
        plan,
        reproduce_command,
        set_aside,
        train_all,
    )

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    plans = plan(args.table, variants, configs_folder(args.configs), Path(args.runs), args.overrides)
    check_overrides(plans, args.overrides)  # against every config, before anything starts
    command = reproduce_command(args.table, variants, args.overrides, args.runs, args.results)
    code = None
    if not args.collect_only:
        if args.rerun:
            for item in plans:
                if item.run_dir.exists():
                    print(f"{item.table}/{item.variant}: previous run moved to {set_aside(item.run_dir)}")
        with _stop_after(args.stop_after):
            code = train_all(plans, args.overrides, args.jobs)
    try:
        rows = collect(plans, Path(args.results), command)
    except NothingToCollect:
        if not code:
            raise
        # Stopped (--stop-after, SIGTERM) before any run's first epoch ended: the stop is the news, not an error.
        print(f"{args.table}: stopped before any run finished an epoch; nothing to collect yet")
        return code
    for row in rows:
        status = f"{row['status']}, valid {row['valid'] or row['best_valid_so_far']:.2f}"
        if row.get("next_stage_waiting"):
            status = f"stage {row['stage']} finished, valid {row['best_valid_so_far']:.2f}; the next has no epoch yet"
        print(f"{row['table']}/{row['variant']}: {status} (paper {row['paper_valid']}), epochs {row['epochs']}")
    print(f"wrote {Path(args.results) / (args.table + '.md')}")
    return code or 0


def _cmd_data(args) -> None:
    from tiedlm.fetch import fetch

    if args.sha256 and len(args.sha256) != 64:
        raise TiedlmError(f"--sha256: expected 64 hexadecimal digits, got {len(args.sha256)} characters")
    if args.retries < 0:
        raise TiedlmError(f"--retries: must be ≥ 0, got {args.retries}")
    cache = Path(args.cache) if args.cache else None
    fetch(args.name, url=args.url, sha256=args.sha256, cache=cache, retries=args.retries)


def _cmd_plot(args) -> None:
    from tiedlm.plot import plot_runs

    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.runs):
        raise TiedlmError(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    if not args.out.endswith(".png"):
        raise TiedlmError(f"--out {args.out}: expected a .png file name")
    print(f"wrote {plot_runs([Path(r) for r in args.runs], Path(args.out), labels)}")


def _cmd_analyze(args) -> None:
    {"subspace": _analyze_subspace, "predictions": _analyze_predictions, "neighbours": _analyze_neighbours}[
        args.analysis
    ](args)


def _command_line(args) -> str:
    import shlex

    return shlex.join(["tiedlm", *args.argv])


def _analyze_subspace(args) -> None:
    import dataclasses

    from tiedlm.analysis import SubspaceSettings, subspace_study

    settings = SubspaceSettings()
    for name in ("betas", "taus", "seeds", "epochs", "words"):
        if getattr(args, name) is not None:
            settings = dataclasses.replace(settings, **{name: getattr(args, name)})
    settings.detach_target = not args.no_detach_target
    for beta in settings.betas:
        if not 0 <= beta <= 1:
            raise TiedlmError(f"--betas: {beta:g} is outside [0, 1]")
    for tau in settings.taus:
        if tau <= 0:
            raise TiedlmError(f"--taus: {tau:g} must be > 0")
    pairs, seeds = len(settings.grid()), len(settings.seeds)
    print(f"subspace: {pairs * seeds} runs ({pairs} (β, τ) × {seeds} seeds), {args.jobs} at a time")

    def progress(run, done, total):
        print(f"[{done}/{total}] β={run['beta']:g} τ={run['tau']:g} seed {run['seed']}: distance "
              f"{run['distance']:.3f} ({run['wall_s']:.0f} s)", flush=True)  # fmt: skip

    record = subspace_study(settings, args.jobs, args.out, _command_line(args), progress)
    print(f"wrote {Path(args.out) / 'subspace.md'} ({record['wall_s'] / 60:.1f} min)")


def _analyze_predictions(args) -> None:
    import time

    from tiedlm.analysis.predictions import compare_predictions, context_predictions, load_pair

    if not args.context and not args.report:
        raise TiedlmError("analyze predictions: give --context TEXT (repeatable) and/or --report FILE")
    began = time.perf_counter()
    models = load_pair(args.checkpoint_a, args.checkpoint_b, _device())
    contexts = []
    for context in args.context:
        tops, unknown = context_predictions(models, context, args.k)
        if unknown:
            print(f"tiedlm: warning: --context: not in the vocabulary, read as <unk>: {' '.join(unknown)}",
                  file=sys.stderr)  # fmt: skip
        contexts.append((context, tops))
        print(f"… {context} ___")
        print(f"  {'A: ' + args.checkpoint_a:<40}  B: {args.checkpoint_b}")
        for (wa, pa), (wb, pb) in zip(tops[0], tops[1], strict=True):
            print(f"  {wa:<20} {pa:.3f}{'':<14}  {wb:<20} {pb:.3f}")
    if not args.report:
        return
    stats = compare_predictions(
        models, (args.checkpoint_a, args.checkpoint_b), contexts, args.report, split=args.split,
        examples=args.examples, seed=args.seed, command=_command_line(args), began=began,
    )  # fmt: skip
    for name, key in (("A", (0, 0)), ("B", (1, 1))):
        s = stats[key]
        print(f"{name}: perplexity {s.perplexity:.2f}, p(<unk>) {s.unk_mass:.4f}, p(top-10 frequent) "
              f"{s.frequent_mass:.4f}, top-{s.top_k} cosine {s.top_cosine:.4f}")  # fmt: skip
    print(f"wrote {args.report}")


def _analyze_neighbours(args) -> None:
    from tiedlm.analysis import nearest_words
    from tiedlm.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint, _device())
    try:
        neighbours = nearest_words(checkpoint.model.embedding.weight, checkpoint.vocab, args.word, args.k)
    except TiedlmError as exc:
        raise TiedlmError(f"{args.checkpoint}: {exc}") from None
    if not checkpoint.config.model.tie_weights:
        print("# untied model: neighbours in the input embedding", file=sys.stderr)
    for word, similarity in neighbours:
        print(f"{word}\t{similarity:.4f}")


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "generate": _cmd_generate,
    "score": _cmd_score,
    "bench": _cmd_bench,
    "reproduce": _cmd_reproduce,
    "analyze": _cmd_analyze,
    "plot": _cmd_plot,
    "data": _cmd_data,
}


def _one_line(message: str) -> str:
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # every write is atomic: leaving anywhere is safe


def main(argv: list[str] | None = None) -> int:
    # SIGTERM ends any command cleanly with 143; while training, the trainer's own handler
    # takes over (finish the window, write a checkpoint) and gives this one back after.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args = _build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        tune_allocator()
        return COMMANDS[args.command](args) or 0
    except TiedlmError as exc:
        print(f"tiedlm: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tiedlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The console entry point: SIGTERM exits cleanly (143) up to the very end of the process."""
    signal.signal(signal.SIGTERM, _terminate)
    code = main()
    if _torchrun_rank():
        # The gloo process group outlives destroy_process_group (C++ holds references to it) and
        # its destructor, run during interpreter finalization, sometimes aborts the process with
        # "terminate called without an active exception" (3 of 120 two-rank CPU launches failed so;
        # pytorch/pytorch#190489). Everything is written and flushed by now, so a rank leaves
        # without finalizing the interpreter.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _torchrun_rank() -> bool:
    from tiedlm.distributed import world_from_env

    try:
        return world_from_env().distributed
    except TiedlmError:
        return False


if __name__ == "__main__":
    run()
