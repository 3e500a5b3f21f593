"""The long fault-injection campaign behind results/reliability.md.

    .venv/bin/python scripts/fault_campaign.py --random-kills 40 --seed 1

Trains a small model in child processes and breaks them in every way the
default tests do, many more times: SIGKILL at random moments and inside each
step of a checkpoint write, SIGINT/SIGTERM (once and twice), damaged
checkpoint files, NaN losses. Each interrupted run is resumed and must end with
weights bit-identical to an uninterrupted run, and every checkpoint under a
real name must verify. Writes results/reliability.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import tiedlm.testing as harness
from tiedlm.runtime import hardware, provenance

ROOT = Path(__file__).resolve().parents[1]


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def outcome(run: Path, reference, config: Path) -> bool:
    harness.train_to_end(config, run)
    intact = harness.visible_files_intact(run)
    final = json.loads((run / "final.json").read_text())
    return (
        intact and harness.same_weights(harness.final_weights(run), reference[0]) and final["test_ppl"] == reference[1]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-kills", type=int, default=40, help="runs killed at random moments")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "reliability")
    parser.add_argument(
        "--part",
        choices=("all", "faults", "inputs"),
        default="all",
        help="faults: kills, signals, damage, NaNs; inputs: the cases of issue 23 (bad input, full disk); "
        "one part alone keeps the other part's rows from OUT.json",
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tiedlm-faults-"))
    started = time.perf_counter()
    config = harness.fault_config(work)

    start = time.perf_counter()
    process = harness.tiedlm("train", config, "--out", work / "reference")
    harness.wait_for(work / "reference" / "checkpoints" / "epoch-0000")
    training_started = time.perf_counter()
    code, err = harness.finish(process)
    assert code == 0, err
    reference_s = time.perf_counter() - start
    training_s = time.perf_counter() - training_started  # from the first checkpoint to the exit
    reference = (
        harness.final_weights(work / "reference"),
        json.loads((work / "reference" / "final.json").read_text())["test_ppl"],
    )
    rows: list[dict] = []

    def record(kind: str, detail: str, faults: int, ok: bool) -> None:
        rows.append({"kind": kind, "detail": detail, "faults": faults, "identical_and_intact": ok})
        print(f"{kind:<22} {detail:<40} faults={faults} ok={ok}", flush=True)

    if args.part != "inputs":
        fault_cases(args, rng, work, config, reference, reference_s, training_s, record)
    if args.part != "faults":
        rows.extend(input_cases(work, config, reference))
    kept: list[dict] = []
    earlier: dict = {}
    if args.part != "all" and args.out.with_suffix(".json").is_file():  # keep the other part's rows
        earlier = json.loads(args.out.with_suffix(".json").read_text())
        keep_inputs = args.part == "faults"
        kept = [row for row in earlier.get("rows", []) if (row["kind"] == "issue-23") == keep_inputs]
    rows[:0] = kept if args.part == "inputs" else []
    rows.extend(kept if args.part == "faults" else [])

    total_s = time.perf_counter() - started
    summary = {
        **provenance("cpu", " ".join([Path(sys.executable).name, *sys.argv])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{hardware('cpu')}, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "seed": args.seed,
        "wall_s": round(total_s, 1),
        "reference_run_s": round(reference_s, 2),
        "reference_training_s": round(training_s, 2),
        "cases": len(rows),
        "faults_injected": sum(r["faults"] for r in rows),
        "all_ok": all(r["identical_and_intact"] for r in rows),
        "part": args.part,
        "rows": rows,
    }
    if kept:  # where the kept rows came from
        summary["other_part"] = {k: earlier.get(k) for k in ("command", "commit", "date", "wall_s", "part")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, args.out.with_suffix(".md"))
    shutil.rmtree(work)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


def fault_cases(args, rng, work: Path, config: Path, reference, reference_s: float, training_s: float, record) -> None:
    """Kills, signals, damaged checkpoints and NaNs: each broken run resumed to bit-identical weights."""
    for index in range(args.random_kills):  # 1 to 3 SIGKILLs at random moments, then resume to the end
        run = work / f"random-{index}"
        kills = rng.randint(1, 3)
        delays = [harness.kill_randomly(config, run, rng, window_s=reference_s) for _ in range(kills)]
        record(
            "sigkill-random", "delays " + ", ".join(f"{d:.2f}s" for d in delays), kills, outcome(run, reference, config)
        )

    for point in harness.KILL_POINTS:  # SIGKILL inside a checkpoint write, at its n-th call
        for nth in (1, 2, 3, 5, 7):
            run = work / f"{point}-{nth}"
            code, _ = harness.finish(harness.tiedlm("train", config, "--out", run, kill_at=(point, nth)))
            killed = code == -signal.SIGKILL
            record("sigkill-in-write", f"{point}, call {nth}", int(killed), outcome(run, reference, config))

    for name, signals in (
        ("sigint", [signal.SIGINT]),
        ("sigterm", [signal.SIGTERM]),
        ("sigint-twice", [signal.SIGINT] * 2),
    ):
        for index in range(4):
            run = work / f"{name}-{index}"
            process = harness.tiedlm("train", config, "--out", run)
            harness.wait_for(run / "checkpoints" / "epoch-0000")
            time.sleep(rng.uniform(0.0, 0.5 * training_s))  # while it trains
            finished = (run / "final.json").exists()  # the run had completed: the signal hits its exit
            for signum in signals:
                process.send_signal(signum)
            code, _ = harness.finish(process)
            expected = {128 + signals[0]} | ({0, -signals[0]} if finished else set())
            ok = code in expected and outcome(run, reference, config)
            when = "after the run completed" if finished else "during training"
            record(name, f"exit {code} ({when}; expected {sorted(expected)})", len(signals), ok)

    damages = {
        "truncate weights": lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
        "flip a byte": lambda f: _flip_middle_byte(f),
        "empty file": lambda f: f.write_bytes(b""),
        "delete file": lambda f: f.unlink(),
    }
    for damage, apply in damages.items():
        for victim in ("model.safetensors", "trainer_state.json", "trainer_state.safetensors", "manifest.json"):
            run = work / f"damage-{damage}-{victim}".replace(" ", "_")
            shutil.copytree(work / "reference", run, ignore=shutil.ignore_patterns(".lock"))
            latest = sorted((run / "checkpoints").iterdir())[-1]
            target = latest / victim
            apply(target)
            (run / "final.json").unlink()
            code, err = harness.finish(harness.tiedlm("train", "--resume", run))
            named = victim in err and "falling back" in err
            ok = (
                code == 0
                and named
                and harness.visible_files_intact(run)
                and harness.same_weights(harness.final_weights(run), reference[0])
            )
            record("damaged-checkpoint", f"{damage}: {victim}", 1, ok)

    nan = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "nan_injection.py"), str(config), str(work / "nan")],
        capture_output=True, text=True,
    )  # fmt: skip
    for line in nan.stdout.splitlines():
        row = json.loads(line)
        record("nan-injection", row["detail"], row["faults"], row["ok"])


# --- issue 23: bad input, from the API as from the CLI, and a disk that fills up during a run --------------

_ENOSPC_CHILD = """
import errno, os, sys
fragment = sys.argv[1]
real = os.fsync

def fsync(fd):  # ENOSPC where delayed allocation reports it: flushing a file or folder to disk
    if fragment in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd)

os.fsync = fsync
from tiedlm.cli import main
sys.exit(main(sys.argv[2:]))
"""

# The one line of an error: the CLI's, or the API's exception as _API_CHILD prints it.
_ERROR_LINE = re.compile(r"^(tiedlm: error: |\w+: )")

_API_CHILD = """
import sys
import tiedlm
from tiedlm.errors import TiedlmError
lm = tiedlm.LanguageModel.from_pretrained(sys.argv[1])
try:
    exec(sys.argv[2])
except TiedlmError as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(2)
"""

_RSS_CHILD = """
import resource, sys
from tiedlm.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr)
sys.exit(code)
"""


def _child(argv: list, cwd: Path | None = None) -> tuple[int, list[str]]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env)
    return done.returncode, done.stderr.strip().splitlines()


def input_cases(work: Path, config: Path, reference) -> list[dict]:
    """One row per case of issue 23: its command, exit code and the one line it printed."""
    import torch

    import tiedlm
    from tiedlm.checkpoint import _seal, run_checkpoints
    from tiedlm.config import load_config
    from tiedlm.data import load_corpus
    from tiedlm.models import build_model

    rows: list[dict] = []
    root = work / "inputs"
    root.mkdir()
    corpus = harness.write_corpus(root / "corpus", words=600)
    tiny = harness.write_config(root / "tiny.toml", corpus)
    options = ["--set", "train.max_epochs=1", "--set", "train.max_steps_per_epoch=3"]
    assert _child(["-m", "tiedlm", "train", tiny, "--out", root / "run", *options])[0] == 0
    ckpt = root / "run" / "best"

    def row(case: str, command: str, code: int, lines: list[str], ok: bool) -> None:
        observed = lines[-1] if lines else ""
        errors = [line for line in lines if _ERROR_LINE.match(line)]
        clean = code == 0 or (len(errors) == 1 and errors[0] == observed and not any("Traceback" in x for x in lines))
        rows.append(
            {
                "kind": "issue-23",
                "detail": case,
                "command": command,
                "exit": code,
                "observed": observed,
                "faults": 1,
                "identical_and_intact": bool(ok and clean),
            }
        )
        print(f"issue-23  {case:<58} exit {code}  {observed[:110]}", flush=True)

    def cli(case: str, args: list, fragments: tuple = (), code_expected: int = 2, cwd: Path | None = None) -> int:
        code, lines = _child(["-m", "tiedlm", *args], cwd=cwd)
        shown = " ".join(shlex.quote(str(a).replace(str(root), "W")) for a in args)
        ok = code == code_expected and all(f in (lines[-1] if lines else "") for f in fragments)
        row(case, f"tiedlm {shown}", code, lines, ok)
        return code

    def api(case: str, statement: str, fragments: tuple, side_check=lambda: True) -> None:
        code, lines = _child(["-c", _API_CHILD, ckpt, statement], cwd=root)
        ok = code == 2 and all(f in (lines[-1] if lines else "") for f in fragments) and side_check()
        row(case, f"lm.{statement.removeprefix('lm.')}", code, lines, ok)

    # 1. save_pretrained never destroys what is not a checkpoint
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("keep me")
    (root / "afile").write_text("keep me too")
    api(
        "1. save_pretrained: a folder that is not a checkpoint",
        "lm.save_pretrained('mine', overwrite=True)",
        ("mine", "not a tiedlm checkpoint"),
        lambda: (root / "mine" / "notes.txt").read_text() == "keep me",
    )
    api(
        "1. save_pretrained: a regular file",
        "lm.save_pretrained('afile', overwrite=True)",
        ("afile", "not a folder"),
        lambda: (root / "afile").read_text() == "keep me too" and not list(root.glob(".afile*")),
    )
    api("1. save_pretrained: an impossible path", "lm.save_pretrained('afile/sub')", ("afile/sub", "cannot write"))
    api(
        "1. save_pretrained: over a checkpoint, no overwrite",
        f"lm.save_pretrained({str(ckpt)!r})",
        ("already holds a checkpoint", "overwrite=True"),
    )

    # 2. one-line errors instead of tracebacks
    for value, extra in (("nan", []), ("inf", []), ("inf", ["--top-k", "3"])):
        cli(
            f"2. generate --temperature={value} {' '.join(extra)}".rstrip(),
            ["generate", ckpt, "--prompt", "w1", f"--temperature={value}", *extra],
            ("--temperature", "finite"),
        )
    for value in ("1e-300", "1e300"):
        cli(
            f"2. generate --temperature {value} --top-k 3 (samples)",
            ["generate", ckpt, "--prompt", "w1", "--temperature", value, "--top-k", "3"],
            code_expected=0,
        )
    cli("2. loss.tau = 0", ["train", tiny, "--set", "loss.tau=0", "--out", root / "o1"], ("loss.tau", "above 0"))
    cli("2. loss.tau < 0", ["train", tiny, "--set", "loss.tau=-1", "--out", root / "o1"], ("loss.tau", "above 0"))
    cli("2. seed beyond torch's range", ["train", tiny, "--set", f"seed={2**64}", "--out", root / "o1"], ("'seed'",))
    cli("2. generate --seed beyond torch's range", ["generate", ckpt, "--seed", str(10**23)], ("--seed", "at most"))
    cli(
        "2. model.hidden_size too large to allocate",
        ["train", tiny, "--set", f"model.hidden_size={2**40}", "--out", root / "o2"],
        ("model.hidden_size", "GiB"),
    )

    # 2. a disk that fills up during the run: ENOSPC at the checkpoint, best/ and final.json writes
    for case, fragment in (
        ("checkpoint", "checkpoints/.epoch-0002.tmp-"),
        ("best/", "/.best.tmp-"),
        ("final.json", "/.final.json.tmp-"),
    ):
        run = root / f"full-{case.strip('/').replace('.', '-')}"
        code, lines = _child(["-c", _ENOSPC_CHILD, fragment, "train", config, "--out", run])
        message = lines[-1] if lines else ""
        previous = harness.visible_files_intact(run) and not [p for p in run.rglob(".*") if ".tmp-" in p.name]
        named = "no space left on the device" in message and "needs about" in message and "--resume" in message
        resumed = outcome(run, reference, config)  # space freed: resume, compare with the uninterrupted run
        row(
            f"2. disk full writing {case} (ENOSPC injected), then resume",
            f"tiedlm train CONFIG --out RUN (fsync of *{fragment}* fails); tiedlm train --resume RUN",
            code,
            lines,
            code == 2 and named and previous and resumed,
        )
    rows.extend(_disk_full_tmpfs(work, config, reference))

    # 3. the API runs the CLI's checks
    api("3. lm.score([])", "lm.score([])", ("InvalidArgument", "texts: is empty"))
    api("3. lm.generate(words=-1)", "lm.generate('w1', words=-1)", ("InvalidArgument", "words: must be at least 1"))
    api("3. lm.generate(top_k=2.5)", "lm.generate('w1', top_k=2.5)", ("top_k: must be an integer",))
    api("3. lm.generate(temperature=nan)", "lm.generate('w1', temperature=float('nan'))", ("temperature: must be",))

    # 4. errors that name the right thing
    bad = root / "bad.toml"
    bad.write_text(tiny.read_text().replace("dropout = 0.3", "dropout = 1.5"))
    cli(
        "4. a bad value in the file, with --set given",
        ["train", bad, "--set", "train.max_epochs=1", "--out", root / "o3"],
        ("bad.toml", "model.dropout"),
    )
    cli(
        "4. too few tokens for the batch size",
        ["train", tiny, "--set", "data.batch_size=400", "--out", root / "o4"],
        ("train.txt (train split)", "data.batch_size = 400"),
    )
    blank = harness.write_corpus(root / "blank", words=200)
    (blank / "train.txt").write_text(" \n\t\n\n")
    cli(
        "4. a whitespace-only train.txt",
        ["train", tiny, "--set", f"data.corpus={blank}", "--out", root / "o5"],
        ("train.txt", "has no words"),
    )
    for missing in ("model.safetensors", "config.json"):
        folder = root / f"no-{missing}"
        shutil.copytree(ckpt, folder)
        (folder / missing).unlink()
        cli(f"4. a checkpoint without {missing}", ["eval", folder], (f"{missing} missing",))
    (root / "young" / "checkpoints").mkdir(parents=True)
    (root / "young" / "run.json").write_text("{}")
    cli("4. a run folder without best/", ["eval", root / "young"], ("run ", "has no best/"))

    # 5. resume after a move
    relative = root / "relative"
    shutil.copytree(corpus, relative / "corpus")
    (relative / "c.toml").write_text(tiny.read_text().replace(f'corpus = "{corpus}"', 'corpus = "corpus"'))
    assert _child(["-m", "tiedlm", "train", "c.toml", "--out", "run", *options], cwd=relative)[0] == 0
    cli(
        "5. a relative corpus, resumed from another folder",
        ["train", "--resume", relative / "run", "--set", "train.max_epochs=2"],
        code_expected=0,
        cwd=work,
    )
    (relative / "corpus").rename(relative / "moved")
    cli(
        "5. the corpus moved, resumed as it was",
        ["train", "--resume", relative / "run", "--set", "train.max_epochs=3"],
        ("cannot read the run's corpus", "--set data.corpus"),
    )
    cli(
        "5. the corpus moved, --set data.corpus=NEW (checksums match)",
        [
            "train",
            "--resume",
            relative / "run",
            "--set",
            f"data.corpus={relative / 'moved'}",
            "--set",
            "train.max_epochs=3",
        ],
        code_expected=0,
    )
    other = harness.write_corpus(root / "other", words=600)
    (other / "test.txt").write_text((other / "test.txt").read_text() + "w1 w2\n")
    cli(
        "5. --set data.corpus=OTHER (test.txt differs)",
        ["train", "--resume", relative / "run", "--set", f"data.corpus={other}", "--set", "train.max_epochs=4"],
        ("test.txt", "refusing to resume on other data"),
    )
    old = root / "old"
    shutil.copytree(relative, old, ignore=shutil.ignore_patterns(".lock"))
    (old / "moved").rename(old / "corpus")
    for folder in [*run_checkpoints(old / "run"), old / "run" / "best"]:  # as tiedlm wrote them before issue 23
        state = json.loads((folder / "trainer_state.json").read_text())
        state.pop("corpus", None)
        (folder / "trainer_state.json").write_text(json.dumps(state))
        saved = json.loads((folder / "config.json").read_text())
        saved["data"]["corpus"] = "corpus"
        (folder / "config.json").write_text(json.dumps(saved))
        _seal(folder)
    cli(
        "5. a checkpoint of the previous format (relative path, no checksums)",
        ["train", "--resume", "run", "--set", "train.max_epochs=4"],
        code_expected=0,
        cwd=old,
    )

    # 6. tiedlm score: peak memory for two long lines (windows of 1,677 tokens), on a PTB-size model
    ptb = load_corpus("ptb")
    model_config = load_config(ROOT / "configs" / "ptb" / "small-real.toml")
    torch.manual_seed(0)
    lm = tiedlm.LanguageModel(build_model(model_config.model, len(ptb.vocab)), ptb.vocab, model_config)
    lm.save_pretrained(root / "ptb-model")
    words = [w for w in ptb.vocab.decode(ptb.train[:44000].tolist()) if w != "<eos>"]
    peaks = {}
    for count in (10000, 40000):
        (root / f"line{count}.txt").write_text(" ".join(words[:count]) + "\n")
        code, lines = _child(["-c", _RSS_CHILD, "score", root / "ptb-model", root / f"line{count}.txt"])
        peaks[count] = int(lines[-1]) if code == 0 else None
    grew = None if None in peaks.values() else peaks[40000] - peaks[10000]
    rows.append(
        {
            "kind": "issue-23",
            "detail": "6. tiedlm score: one line of 10,000 vs 40,000 words, |V| = 10,000",
            "command": "tiedlm score PTB-SIZE-CKPT LINE.txt",
            "exit": code,
            "observed": f"peak RSS {peaks[10000]} MiB vs {peaks[40000]} MiB ({grew:+} MiB; one pass over 40,000 "
            f"words would hold 40,000 x |V| fp32 logits, 1,526 MiB per copy)",
            "faults": 1,
            "identical_and_intact": grew is not None and grew < 50,
        }
    )
    print(f"issue-23  {rows[-1]['detail']:<58} {rows[-1]['observed']}", flush=True)
    return rows


def _disk_full_tmpfs(work: Path, config: Path, reference) -> list[dict]:
    """A real full disk where this process may mount a small tmpfs (root): filled up while the run trains."""
    mount = work / "tmpfs"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        print("issue-23  disk full on a real tmpfs: skipped (cannot mount one here)", flush=True)
        return []
    try:
        run = mount / "run"
        process = harness.tiedlm("train", config, "--out", run)
        harness.wait_for(run / "checkpoints" / "epoch-0001")
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"\0" * (1 << 16)):
                pass
        except OSError:  # the disk is full now
            pass
        finally:
            os.close(filler)
        code, err = harness.finish(process)
        lines = err.strip().splitlines()
        message = lines[-1] if lines else ""
        named = "no space left on the device" in message and "needs about" in message
        previous = harness.visible_files_intact(run) and not [p for p in run.rglob(".*") if ".tmp-" in p.name]
        (mount / "filler").unlink()
        resumed = outcome(run, reference, config)
        print(f"issue-23  disk full on a 24 MiB tmpfs, filled after epoch 1       exit {code}  {message[:110]}")
        return [
            {
                "kind": "issue-23",
                "detail": "2. disk full on a real 24 MiB tmpfs, filled while training, then resume",
                "command": "tiedlm train CONFIG --out TMPFS/RUN; fill TMPFS; rm the filler; tiedlm train --resume RUN",
                "exit": code,
                "observed": message,
                "faults": 1,
                "identical_and_intact": code == 2 and named and previous and resumed,
            }
        ]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def write_markdown(summary: dict, path: Path) -> None:
    kinds: dict[str, list[dict]] = {}
    for row in summary["rows"]:
        kinds.setdefault(row["kind"], []).append(row)
    table = "\n".join(
        f"| {kind} | {len(rows)} | {sum(r['faults'] for r in rows)} | {sum(r['identical_and_intact'] for r in rows)} |"
        for kind, rows in kinds.items()
    )
    failures = [r for r in summary["rows"] if not r["identical_and_intact"]]
    passed = len(summary["rows"]) - len(failures)
    other = summary.get("other_part")
    kept = (
        f"\n- the rows of the other part are kept from an earlier run: `{other['command']}`, commit "
        f"`{other['commit']}`, date {other['date']}, {other['wall_s']} s"
        if other
        else ""
    )
    cells = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    inputs = "\n".join(
        f"| {cells(r['detail'])} | `{cells(r['command'])}` | {r['exit']} | {cells(r['observed'])} | "
        f"{'yes' if r['identical_and_intact'] else '**no**'} |"
        for r in kinds.get("issue-23", [])
    )
    text = f"""# Reliability: fault-injection campaign

Generated by `scripts/fault_campaign.py` (do not edit by hand); the per-case
rows are in [`reliability.json`](reliability.json).

- command: `{summary["command"]}`
- commit: `{summary["commit"]}`, date {summary["date"]}
- machine: {summary["machine"]}, Python {summary["python"]}; seed {summary["seed"]}
- wall time: {summary["wall_s"]} s (one uninterrupted run: {summary["reference_run_s"]} s, of which
  {summary["reference_training_s"]} s from the first checkpoint to the exit)
- part run: {summary.get("part", "all")}{kept}

## What was tried

A small VD-LSTM with the augmented loss (tiedlm.testing's tiny config, 4
epochs) is trained in a child process and broken; the run is then resumed
with `tiedlm train --resume RUN` until it completes. A case passes when its
final weights are **bit-identical** to an uninterrupted run with the same
seed, its test perplexity is the same, and every checkpoint folder under a
real name verifies against its SHA-256 manifest.

| kind | cases | faults injected | passed |
|---|---:|---:|---:|
{table}
| **total** | {summary["cases"]} | {summary["faults_injected"]} | {passed} |

- **sigkill-random**: 1–3 `SIGKILL`s per run at uniformly random moments
  (start-up, training, validation, checkpoint writes alike).
- **sigkill-in-write**: the process kills itself inside a checkpoint write, at
  the n-th call of: `save_model` (weights in the temporary folder),
  `_seal` (before the manifest), `_install_dir` (old folder renamed away,
  new one not yet in place), `remove_dir` (old checkpoint renamed, not deleted).
- **sigint / sigterm**: one signal at a random moment while the run trains
  (between its first checkpoint and half of an uninterrupted run's remaining
  time): the current window finishes, a checkpoint is written, and the exit
  code must be 130 / 143. A signal that arrives after the run has completed
  (its final.json exists) hits the process's exit; then exit 0 or death by the
  signal is also accepted, and the row says so.
  **sigint-twice**: the second signal exits at once.
- **damaged-checkpoint**: a file of the newest checkpoint truncated, altered,
  emptied or deleted; `--resume` must name it, fall back to the previous
  checkpoint, and retrain the lost epoch to the same weights.
- **nan-injection**: NaN losses injected into training in-process (single
  steps, and runs of `nonfinite_patience` in a row that force a rollback with
  the learning rate halved); passes when the steps are skipped and logged,
  the rollback happens, and the weights stay finite.
- **issue-23**: bad input and a disk that fills up during a run (below).

## Bad input and full disks (issue 23)

Each case of issue 23, run in a child process (`W` is the campaign's work
folder; `lm` is `tiedlm.LanguageModel.from_pretrained` of a trained tiny run,
and an API case prints its exception as `Class: message`). A case passes when
it ends as expected (exit 0, or 2 with exactly one error line and no
traceback) and its line names what it should; the disk-full cases also need
the previous checkpoints intact, no temporary folder left, and a resume,
after space is freed, to reach the weights of an uninterrupted run
bit-identically. ENOSPC is injected in the fsync of the file or folder being
written (where delayed allocation reports it); where the campaign may mount
a tmpfs (as root), a real 24 MiB tmpfs is also filled up while the run trains.

| case | command | exit | observed (last line of stderr) | passed |
|---|---|---:|---|---|
{inputs}

## Result

{"Nothing was lost: every case passed." if summary["all_ok"] else "FAILURES: " + json.dumps(failures)}
At most the current epoch's progress is redone after a `SIGKILL`; a signal
loses nothing.
"""
    path.write_text(text)


if __name__ == "__main__":
    main()
