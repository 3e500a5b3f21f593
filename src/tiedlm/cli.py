"""The ``tiedlm`` command: parses arguments and calls the library.

Every user error ends as one line on stderr, ``tiedlm: error: …``, and exit
code 2; nothing already written is overwritten.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from tiedlm import __version__
from tiedlm.errors import TiedlmError
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

    evaluate = commands.add_parser("eval", help="perplexity of a checkpoint on a split")
    evaluate.add_argument("checkpoint", help="checkpoint folder, or a run folder (uses its best/)")
    evaluate.add_argument("--split", choices=("valid", "test"), default="valid")
    evaluate.add_argument("--batch-size", type=_positive_int, help="default: the config's eval_batch_size")
    evaluate.add_argument("--data", help="corpus to evaluate on (default: the one it was trained on)")
    evaluate.add_argument("--precision", choices=("fp32", "bf16"), help="default: the precision it was trained in")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    generate = commands.add_parser("generate", help="sample text after a prompt")
    generate.add_argument("checkpoint")
    generate.add_argument("--prompt", default="", help="words to continue (out-of-vocabulary words become <unk>)")
    generate.add_argument("--words", type=_positive_int, default=50)
    generate.add_argument("--temperature", type=float, default=1.0, help="0 = always the most likely word")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely words (0 = all)")
    generate.add_argument("--seed", type=int, default=None)

    score = commands.add_parser("score", help="log-probability and perplexity of each line of a file")
    score.add_argument("checkpoint")
    score.add_argument("file", help="text file, or - for standard input")
    score.add_argument("--batch-size", type=_positive_int, default=32)
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
    reproduce.add_argument("--configs", default="configs", help="folder holding ptb/ and wikitext-2/ configs")
    reproduce.add_argument("--runs", default="runs", help="run folders go to RUNS/TABLE/VARIANT")
    reproduce.add_argument("--results", default="results", help="where TABLE.md, .json, .png and the logs go")
    reproduce.add_argument("--jobs", type=_positive_int, default=1, help="variants trained at once (threads split)")
    reproduce.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="config override for every variant, e.g. --set train.precision=bf16")  # fmt: skip
    reproduce.add_argument("--rerun", action="store_true", help="train again even where a run finished")
    reproduce.add_argument("--collect-only", action="store_true", help="train nothing; write the results")
    return parser


def _device(name: str = "auto"):
    from tiedlm.train import resolve_device

    return resolve_device(name)


def _cmd_train(args) -> int:
    from tiedlm.checkpoint import MODEL_FILE, load_checkpoint, load_latest_good
    from tiedlm.config import apply_overrides, config_from_dict, load_config
    from tiedlm.train import Interrupted, Trainer

    if args.config is None and args.resume is None:
        raise TiedlmError("train: give a CONFIG, or --resume DIR")
    if args.resume is not None:
        resume = Path(args.resume)
        if (resume / MODEL_FILE).exists():  # one checkpoint folder, inside RUN/checkpoints/ or RUN/best
            run_dir = resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
        elif resume.is_dir():
            run_dir = resume
        else:
            raise TiedlmError(f"--resume {resume}: no such run or checkpoint folder")
        if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
            raise TiedlmError(f"--out {args.out}: a resumed run continues in its own folder {run_dir}")
        if args.config is not None:
            config = load_config(args.config, args.overrides)
        else:
            source = load_checkpoint(resume) if resume != run_dir else load_latest_good(run_dir)[0]
            saved = source.config.to_dict()
            for text in args.overrides:
                config_from_dict(apply_overrides(saved, [text]), f"--set {text!r}")
            config = config_from_dict(apply_overrides(saved, args.overrides), f"checkpoint {source.path}")
        trainer = Trainer(config, run_dir, resume=resume)
    else:
        config = load_config(args.config, args.overrides)
        run_dir = Path(args.out) if args.out else Path("runs") / config.name
        trainer = Trainer(config, run_dir)
    try:
        report = trainer.fit()
    except Interrupted as stop:
        print(f"tiedlm: {stop}; continue with: tiedlm train --resume {run_dir}", file=sys.stderr)
        return stop.exit_code
    print(json.dumps(report))
    print(
        f"best epoch {report['best_epoch']}: valid perplexity {report['valid_ppl']:.2f}, "
        f"test perplexity {report['test_ppl']:.2f}  ({run_dir})"
    )
    return 0


def _cmd_eval(args) -> None:
    from tiedlm.checkpoint import load_checkpoint
    from tiedlm.data import load_corpus
    from tiedlm.evaluate import evaluate

    checkpoint = load_checkpoint(args.checkpoint, _device())
    corpus = load_corpus(args.data or checkpoint.config.data.corpus, vocab=checkpoint.vocab)
    batch_size = args.batch_size or checkpoint.config.data.eval_batch_size
    config = checkpoint.config
    precision = args.precision or config.train.precision
    result = evaluate(checkpoint.model, corpus.split(args.split), batch_size, config.data.bptt, precision)
    record = {
        "checkpoint": str(checkpoint.path),
        "corpus": corpus.name,
        "split": args.split,
        "batch_size": batch_size,
        "precision": precision,
        "tokens": result.tokens,
        "loss": result.loss,
        "perplexity": result.perplexity,
    }
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{args.split} perplexity {result.perplexity:.2f} ({result.tokens} tokens, batch size {batch_size})")


def _cmd_generate(args) -> None:
    from tiedlm.checkpoint import load_checkpoint
    from tiedlm.generate import format_words, generate

    checkpoint = load_checkpoint(args.checkpoint, _device())
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
    from tiedlm.config import load_config
    from tiedlm.reproduce import collect, plan, set_aside, train_all

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    plans = plan(args.table, variants, Path(args.configs), Path(args.runs))
    for item in plans:  # check the overrides against every config before anything starts
        load_config(item.config, args.overrides)
    command = f"tiedlm reproduce {args.table}"
    if variants != ["vd", "al", "re", "real"]:
        command += f" --variants {','.join(variants)}"
    command += "".join(f" --set {text}" for text in args.overrides)
    code = None
    if not args.collect_only:
        if args.rerun:
            for item in plans:
                if item.run_dir.exists():
                    print(f"{item.table}/{item.variant}: previous run moved to {set_aside(item.run_dir)}")
        code = train_all(plans, args.overrides, args.jobs)
    rows = collect(plans, Path(args.results), command)
    for row in rows:
        print(
            f"{row['table']}/{row['variant']}: {row['status']}, valid {row['valid'] or row['best_valid_so_far']:.2f}"
            f" (paper {row['paper_valid']}), epochs {row['epochs']}"
        )
    print(f"wrote {Path(args.results) / (args.table + '.md')}")
    return code or 0


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "generate": _cmd_generate,
    "score": _cmd_score,
    "bench": _cmd_bench,
    "reproduce": _cmd_reproduce,
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
    sys.exit(main())


if __name__ == "__main__":
    run()
