"""scripts/gpu_run.sh: its CPU dry run end to end, and the limits on what it returns in $OUT."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tiedlm import gpu_out, gpu_run
from tiedlm.cli import main

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def assert_returnable(out: Path) -> list[Path]:
    """What the device tool brings back: at most 8 plain files of at most 16 MiB, plainly named."""
    files = sorted(out.iterdir())
    assert 0 < len(files) <= 8, [f.name for f in files]
    for path in files:
        assert path.is_file() and ALLOWED_NAME.match(path.name), path.name
        assert path.stat().st_size <= 16 << 20, path.name
    return files


def test_dry_run_trains_the_queue_and_returns_collectable_runs(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    # Two runs of the queue, side by side: the dry run's own default (all eight, one at a time after
    # measuring two workers at once) takes a minute; the pieces left out are tested below.
    only = "wikitext-2-medium/re,wikitext-2-medium/real"
    command = ["bash", str(ROOT / "scripts" / "gpu_run.sh"), "--dry-run", "--work", str(work), "--out", str(out),
               "--speed-seconds", "0.3", "--only", only, "--jobs", "2"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| wikitext-2-medium/real | exit 0 | 2 |" in done.stdout  # the summary table ends the output
    names = [path.name for path in assert_returnable(out)]
    assert {"summary.json", "logs.tar.gz", "runs.tar.gz", "results.tar.gz"} <= set(names)
    summary = json.loads((out / "summary.json").read_text())
    check = summary["selfcheck"]
    assert check["captured_ok"] and check["device"] == "cpu"
    assert [c["name"] for c in check["checks"]] == ["captured fp32 (cell off) vs eager fp32"]  # no Triton cell on a CPU
    assert check["checks"][0]["max_rel_loss_diff"] < 1e-4 and check["checks"][0]["windows"]["buffered"] == 8
    assert check["speed"]["captured"]["tok_s"] > 0 and check["speed"]["eager"]["tok_s"] > 0
    assert summary["cuda_graph"] == "auto" and summary["cuda_cell"] == "off"
    assert summary["jobs"] == 2 and "concurrency" not in summary  # --jobs given: nothing to measure
    runs = {row["variant"]: row for row in summary["runs"]}
    assert set(runs) == {"re", "real"}
    for row in runs.values():
        assert row["status"] == "exit" and row["exit"] == 0 and row["epochs"] == 2
        assert row["stopped_by"] == "max_epochs" and row["valid_ppl"] > 1
    assert summary["collect"] == {"wikitext-2-medium": 0}
    # The small checkpoints of the dry run fit, so they come back too.
    assert "ckpt-wikitext-2-medium-real.tar" in names
    # Collected here from runs.tar.gz alone, as after a lease.
    unpacked = tmp_path / "back"
    with tarfile.open(out / "runs.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    assert not list(unpacked.rglob("*.safetensors"))  # only the small files
    results = tmp_path / "results"
    code = main(["reproduce", "wikitext-2-medium", "--collect-only", "--runs", str(unpacked / "runs"),
                 "--results", str(results), "--variants", "re,real"])  # fmt: skip
    assert code == 0
    table = (results / "wikitext-2-medium.md").read_text()
    assert table.count("stopped by max_epochs") == 2
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = tar.getnames()
    assert {"logs/gpu_run.log", "logs/selfcheck.json", "logs/wikitext-2-medium-real.log"} <= set(logs)


def _fake_run(runs: Path, table: str, variant: str, model_bytes: int) -> None:
    run = runs / table / variant
    for folder in (run / "best", run / "checkpoints" / "epoch-0001"):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(os.urandom(model_bytes))
        (folder / "vocab.txt").write_text("a\nb\n")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "valid_ppl": 9.0, "elapsed_s": 3.0}) + "\n")
    (run / "run.json").write_text("{}\n")
    (runs / table / f"{variant}.log").write_text("log\n")


def test_out_keeps_to_eight_files_and_leaves_out_checkpoints_that_do_not_fit(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    runs = work / "runs"
    for index in range(8):  # small checkpoints: more than the slots left
        _fake_run(runs, "ptb-medium", f"v{index}", 1000)
    _fake_run(runs, "wikitext-2-medium", "real", 9 << 20)  # two copies: 18 MiB, over one file's 16
    out.mkdir()
    summary = {"runs": []}
    files = gpu_out.pack_out(work, runs, out, summary, checkpoints=True)
    assert_returnable(out)
    assert len(files) == 8 and "summary.json" in files and "runs.tar.gz" in files
    assert not (out / "ckpt-wikitext-2-medium-real.tar").exists()
    assert any(
        "wikitext-2-medium/real: checkpoint not returned (18 MiB" in note for note in summary["checkpoint_notes"]
    )
    assert json.loads((out / "summary.json").read_text())["checkpoint_notes"] == summary["checkpoint_notes"]
    with tarfile.open(out / "runs.tar.gz") as tar:
        assert "runs/wikitext-2-medium/real/best/vocab.txt" in tar.getnames()
    # A later pack without checkpoints removes the ones it no longer writes.
    gpu_out.pack_out(work, runs, out, summary, checkpoints=False)
    assert not list(out.glob("ckpt-*"))


def test_no_run_starts_past_the_deadline(tmp_path, monkeypatch):
    args = gpu_run._parser().parse_args(
        ["--dry-run", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--budget-s", "1"]
    )
    monkeypatch.setenv("GPU_RUN_T0", "1000")  # long past: the deadline has gone
    driver = gpu_run.Driver(args)
    driver.run_queue(1, "auto", "fp32")
    rows = driver.summary["runs"]
    assert [(r["table"], r["variant"]) for r in rows] == list(gpu_run.QUEUE)
    assert {r["status"] for r in rows} == {"not started"}
    assert not (tmp_path / "w" / "runs").exists() or not list((tmp_path / "w" / "runs").rglob("metrics.jsonl"))


@pytest.mark.parametrize("only", ["ptb-small/re", "wikitext-2-medium"])
def test_only_names_items_of_the_queue(tmp_path, only):
    args = gpu_run._parser().parse_args(["--dry-run", "--work", str(tmp_path), "--only", only])
    with pytest.raises(SystemExit, match="not in the queue"):
        gpu_run.Driver(args).plans()


def _span(tok_s, start, end):
    return {"tok_s": tok_s, "start_wall": start, "end_wall": end}


def test_two_runs_at_once_only_where_they_raise_the_total_throughput():
    verdict = gpu_run.concurrency_verdict
    assert verdict(100.0, [_span(60, 0, 10), _span(60, 0.5, 10.5)])["jobs"] == 2  # 1.2x, 95% side by side
    assert verdict(100.0, [_span(52, 0, 10), _span(52, 0, 10)])["jobs"] == 1  # 1.04x: time-sliced, no gain
    assert verdict(100.0, [_span(90, 0, 10), _span(90, 9, 19)])["jobs"] == 1  # mostly timed alone
    assert verdict(100.0, [_span(90, 0, 10)])["jobs"] == 1  # one worker failed
    assert verdict(100.0, [_span(60, 0, 10), _span(60, 0, 10)])["gain"] == pytest.approx(1.2)


def test_a_speed_worker_waits_for_go_and_reports_its_timed_span(tmp_path):
    import torch

    ready, go = tmp_path / "ready", tmp_path / "go"
    go.write_text("go")
    config = ROOT / "configs" / gpu_run.SPEED_CONFIG
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = gpu_run.measure_speed(
            config, torch.device("cpu"), "fp32", True, 0.05, dry_run=True, ready=ready, go=go
        )
    finally:
        torch.set_num_threads(threads)
    assert ready.read_text() == "ready\n"
    assert report["windows"] >= 1 and report["tok_s"] > 0 and report["end_wall"] >= report["start_wall"]
    assert report["counts"]["buffered"] >= 1 and report["capture_failed"] is None  # the captured step, buffered
