"""`tiedlm reproduce`: trains the four variants of a table (or collects them) and writes the results."""

import json
import re

import pytest

from conftest import write_config
from tiedlm.cli import main
from tiedlm.reproduce import count_parameters
from tiedlm.results_table import fit_lines, ordering, ordering_verdict, stretch_lines
from tiedlm.stretches import hardware_text, stretch_rows

PAPER = {"vd": (92.6, 87.3), "al": (86.3, 82.9), "re": (89.9, 85.1), "real": (86.3, 82.7)}
SETTINGS = {"vd": (False, False), "al": (False, True), "re": (True, False), "real": (True, True)}


@pytest.fixture
def tables(tmp_path, corpus_dir):
    """configs/ptb/small-{vd,al,re,real}.toml for the tiny corpus, with the paper's numbers."""
    configs = tmp_path / "configs"
    (configs / "ptb").mkdir(parents=True)
    for variant, (tie, augmented) in SETTINGS.items():
        path = write_config(configs / "ptb" / f"small-{variant}.toml", corpus_dir, tie=tie, augmented=augmented)
        valid, test = PAPER[variant]
        path.write_text(path.read_text() + f'\n[paper]\nvalid = {valid}\ntest = {test}\nsource = "test"\n')
    return tmp_path


def reproduce(root, *extra):
    return main(
        [
            "reproduce",
            "ptb-small",
            "--configs",
            str(root / "configs"),
            "--runs",
            str(root / "runs"),
            "--results",
            str(root / "results"),
            *extra,
        ]
    )


def test_reproduce_trains_all_variants_and_writes_the_results(tables):
    assert reproduce(tables, "--jobs", "2", "--set", "train.max_epochs=2") == 0
    results = tables / "results"
    rows = json.loads((results / "ptb-small.json").read_text())
    assert [row["variant"] for row in rows] == ["vd", "al", "re", "real"]
    for row in rows:
        run = tables / "runs" / "ptb-small" / row["variant"]
        final = json.loads((run / "final.json").read_text())
        assert row["valid"] == final["valid_ppl"] and row["test"] == final["test_ppl"]
        assert (row["paper_valid"], row["paper_test"]) == PAPER[row["variant"]]
        config = json.loads((run / "config.json").read_text())
        vocab = len((run / "best" / "vocab.txt").read_text().split())
        assert row["params"] == count_parameters(config, vocab)
        assert row["epochs"] == 2 and row["wall_s"] > 0 and row["seed"] == 3
        assert row["command"].startswith("tiedlm train ") and "train.max_epochs=2" in row["command"]
        for key in ("hardware", "commit"):
            assert key in row
        log = results / row["log"]
        assert log.read_text() == (run / "metrics.jsonl").read_text()
    # Tying removes the decoder matrix (and bias): RE has fewer parameters than VD.
    assert rows[2]["params"] < rows[0]["params"]
    assert (results / "ptb-small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (results / "ptb-small.md").read_text()
    assert "![validation learning curves](ptb-small.png)" in text
    assert "| VD + RE + AL (REAL) | 86.3 | 82.7 |" in text
    assert "(ptb-small/real.jsonl)" in text


def test_finished_runs_are_collected_not_rerun(tables, capsys):
    assert reproduce(tables, "--variants", "vd,real", "--set", "train.max_epochs=1") == 0
    final = tables / "runs" / "ptb-small" / "vd" / "final.json"
    before = final.stat().st_mtime_ns
    capsys.readouterr()
    assert reproduce(tables, "--variants", "vd,real") == 0
    assert "training" not in capsys.readouterr().out
    assert final.stat().st_mtime_ns == before
    # --rerun trains again and keeps the earlier run beside the new one.
    assert reproduce(tables, "--variants", "vd", "--rerun", "--set", "train.max_epochs=1") == 0
    kept = [p.name for p in (tables / "runs" / "ptb-small").iterdir() if p.name.startswith("vd.replaced-")]
    assert len(kept) == 1 and final.stat().st_mtime_ns != before


def test_an_interrupted_run_is_resumed(tables):
    run = tables / "runs" / "ptb-small" / "re"
    assert main(["train", str(tables / "configs" / "ptb" / "small-re.toml"), "--out", str(run)]) == 0
    (run / "final.json").unlink()  # as if stopped after its last checkpoint
    assert reproduce(tables, "--variants", "re") == 0
    info = json.loads((run / "run.json").read_text())
    assert len(info["resumed"]) == 1 and (run / "final.json").is_file()
    assert info["resumed"][0]["hardware"] == info["hardware"] and info["resumed"][0]["threads"] >= 1
    rows = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert rows[0]["resumed"] and rows[0]["status"] == "finished"
    # the commits are listed in the order the run used them, not sorted
    info["commit"], info["resumed"][0]["commit"] = "f" * 40, "0" * 40
    (run / "run.json").write_text(json.dumps(info))
    assert reproduce(tables, "--variants", "re", "--collect-only") == 0
    rows = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert rows[0]["commits"] == ["f" * 40, "0" * 40]
    # a run resumed twice by the same command lists that command once, with the count
    info["resumed"].append(dict(info["resumed"][0]))
    (run / "run.json").write_text(json.dumps(info))
    assert reproduce(tables, "--variants", "re", "--collect-only") == 0
    table = (tables / "results" / "ptb-small.md").read_text()
    assert table.count("  - resumed 2 times: `tiedlm train --resume ") == 1 and "  - resumed: " not in table


def test_a_run_resumed_on_other_hardware_names_both():
    info = {"hardware": "AMD EPYC, 2 threads", "resumed": [{"hardware": "AMD EPYC, 1 thread"}, {"command": []}]}
    assert hardware_text(info) == "AMD EPYC, 2 threads; resumed on AMD EPYC, 1 thread"
    info["resumed"] = [{"hardware": "AMD EPYC, 2 threads"}]
    assert hardware_text(info) == "AMD EPYC, 2 threads"


def test_every_stretch_of_a_run_is_listed_with_its_machine_and_epochs():
    config = {"train": {"precision": "fp32"}}
    info = {
        "started": "2026-12-01T09:43:15+00:00", "hardware": "AMD EPYC, 1 thread", "commit": "a" * 40,
        "resumed": [
            {"from_epoch": 9, "hardware": "AMD EPYC, 2 threads", "cpu_features": "AVX2", "precision": "bf16"},
            {"from_epoch": 9, "hardware": "NVIDIA H200", "precision": "fp32", "commit": "b" * 40},  # stopped mid-epoch
        ],
    }  # fmt: skip
    stretches = stretch_rows(info, config, last_epoch=12)
    assert [s["epochs"] for s in stretches] == ["1–8", "", "9–12"]
    assert [s["precision"] for s in stretches] == ["fp32", "bf16", "fp32"]
    assert [s["hardware"] for s in stretches] == ["AMD EPYC, 1 thread", "AMD EPYC, 2 threads", "NVIDIA H200"]
    row = {"name": "VD", "stage": 1, "stages": 1, "stretches": stretches}
    lines = stretch_lines([row])[-3:]
    assert lines[0] == "| VD | 1 | 2026-12-01 09:43 | 1–8 | AMD EPYC, 1 thread | not recorded | fp32 | `aaaaaaaa` |"
    assert lines[1] == "| VD | 2 | ? | — | AMD EPYC, 2 threads | AVX2 | bf16 | ? |"
    assert lines[2].startswith("| VD | 3 | ? | 9–12 | NVIDIA H200 |")


def test_unfinished_runs_are_reported_as_in_progress(tables):
    run = tables / "runs" / "ptb-small" / "vd"
    assert main(["train", str(tables / "configs" / "ptb" / "small-vd.toml"), "--out", str(run)]) == 0
    (run / "final.json").unlink()
    assert reproduce(tables, "--collect-only") == 0
    rows = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert len(rows) == 1 and rows[0]["status"] == "in progress" and rows[0]["valid"] is None
    assert rows[0]["best_valid_so_far"] > 1
    assert (
        "in progress after 2 of 2 epochs: the command at the top of this file again resumes it"
        in (tables / "results" / "ptb-small.md").read_text()
    )
    # The paper's ordering covers every variant of the table, run or not.
    text = (tables / "results" / "ptb-small.md").read_text()
    assert "- paper, test: REAL 82.7 < AL 82.9 < RE 85.1 < VD 87.3" in text
    # AL and REAL share 86.3 on valid: a tie is shown as one, not as an order.
    assert "- paper, valid: AL 86.3 = REAL 86.3 < RE 89.9 < VD 92.6" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["reproduce", "ptb-tiny"], "unknown table 'ptb-tiny'"),
        (["reproduce", "ptb-small", "--variants", "vd,xx"], "unknown variant 'xx'"),
        (["reproduce", "ptb-small", "--configs", "/nonexistent"], "small-vd.toml: no such config"),
        (["reproduce", "ptb-small", "--set", "train.nope=1"], "train.nope"),
    ],
)
def test_bad_reproduce_arguments_are_one_line_errors(tables, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tables)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tables / "runs").exists() and not (tables / "results").exists()


def test_collect_only_without_runs_is_an_error(tables, capsys):
    assert reproduce(tables, "--collect-only") == 2
    assert "no run has finished an epoch yet" in capsys.readouterr().err


def test_a_stop_before_the_first_epoch_ends_is_a_stop_not_an_error(tables, capsys, monkeypatch):
    import tiedlm.reproduce

    # The trainers were stopped (--stop-after, SIGTERM) before any epoch ended: 143, so a queue can resume.
    monkeypatch.setattr(tiedlm.reproduce, "train_all", lambda plans, overrides, jobs: 143)
    assert reproduce(tables, "--variants", "al") == 143
    out, err = capsys.readouterr()
    assert "stopped before any run finished an epoch; nothing to collect yet" in out and err == ""
    assert not (tables / "results").exists()


def test_ordering_verdict_checks_the_papers_claim_pair_by_pair():
    def rows(**test):
        return [{"variant": v, "test": x} for v, x in test.items()]

    assert ordering_verdict(rows(real=82.7, al=82.9, re=85.1, vd=87.3), "test") == "holds (REAL, AL, RE, VD)"
    # REAL may tie AL; no other pair may tie.
    assert ordering_verdict(rows(real=86.3, al=86.3), "test").startswith("holds")
    assert ordering_verdict(rows(re=85.0, vd=85.0), "test") == "does not hold (RE, VD): VD 85.00 ≤ RE 85.00"
    # A missing variant is skipped, not assumed: REAL vs VD is still checked.
    assert ordering_verdict(rows(real=89.0, vd=88.0), "test") == "does not hold (REAL, VD): VD 88.00 ≤ REAL 89.00"
    assert ordering_verdict(rows(real=89.0), "test") == "too few finished runs to check"
    assert ordering(rows(real=86.3, al=86.34, vd=92.6), "test") == "REAL 86.3 = AL 86.3 < VD 92.6"


def test_fit_lines_show_the_gap_and_the_recent_gain():
    curve = [{"epoch": e, "lr": 0.5**e, "train_ppl": 100.0 - e, "valid_ppl": 120.0 - 2 * e} for e in range(1, 9)]
    row = {"name": "VD", "curve": curve}
    line = fit_lines([row])[-2]
    # Epoch 8: train 92, valid 104 (gap +12); valid fell 2 per epoch over the last 5.
    assert line == "| VD | 8 | 0.00391 | 92.0 | 104.0 | +12.0 | +2.00 |"
    # One epoch only: no gain to show; a log without lr shows a dash.
    short = {"name": "VD", "curve": [{"epoch": 1, "train_ppl": 300.0, "valid_ppl": 250.0}]}
    assert fit_lines([short])[-2] == "| VD | 1 | — | 300.0 | 250.0 | -50.0 | — |"
    # A variant trained in stages has one line per stage, each named.
    staged = [{**row, "stage": n, "stages": 2} for n in (1, 2)]
    assert [line.split(" | ")[0] for line in fit_lines(staged)[-3:-1]] == ["| VD, stage 1", "| VD, stage 2"]


def test_a_run_that_differs_from_its_config_file_says_so(tables):
    assert reproduce(tables, "--variants", "re", "--set", "model.output_bias=on") == 0
    rows = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert rows[0]["differs_from_config"] == [{"key": "model.output_bias", "run": "on", "file": "auto"}]
    generated = (tables / "results" / "ptb-small.md").read_text().split("`")[1]
    assert generated.startswith("tiedlm reproduce ptb-small --variants re --set model.output_bias=on --runs ")
    config = tables / "configs" / "ptb" / "small-re.toml"  # the file edited after the run
    config.write_text(config.read_text().replace("[model]\n", '[model]\noutput_bias = "on"\n'))
    assert reproduce(tables, "--variants", "re", "--collect-only") == 0
    rows = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert rows[0]["differs_from_config"] == []
    assert "differs from its config file" not in (tables / "results" / "ptb-small.md").read_text()
    text = config.read_text().replace('output_bias = "on"\n', "")
    config.write_text(re.sub(r"\ndropout = [0-9.]+\n", "\ndropout = 0.25\n", text))
    assert reproduce(tables, "--variants", "re", "--collect-only") == 0
    drift = json.loads((tables / "results" / "ptb-small.json").read_text())[0]["differs_from_config"]
    assert {d["key"] for d in drift} == {"model.output_bias", "model.dropout"}
    assert "`model.dropout`" in (tables / "results" / "ptb-small.md").read_text()


def test_a_run_stopped_by_its_time_limit_says_how_to_go_on(tables):
    run = tables / "runs" / "ptb-small" / "vd"
    config = str(tables / "configs" / "ptb" / "small-vd.toml")
    limited = ["--set", "train.time_limit_minutes=1e-6", "--set", "train.max_epochs=3"]
    assert main(["train", config, "--out", str(run), *limited]) == 0
    assert reproduce(tables, "--variants", "vd", "--collect-only") == 0
    text = (tables / "results" / "ptb-small.md").read_text()
    assert "stopped by its time limit after 1 of 3 epochs" in text
    assert f"`tiedlm train --resume {run} --set train.time_limit_minutes=0`" in text
    # Resumed past its limit: until the new final.json, the old one does not make the run finished.
    stale = (run / "final.json").read_text()
    assert main(["train", "--resume", str(run), "--set", "train.time_limit_minutes=0"]) == 0
    (run / "final.json").write_text(stale)
    assert reproduce(tables, "--variants", "vd", "--collect-only") == 0
    rows = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert rows[0]["status"] == "in progress" and rows[0]["epochs"] == 3
    assert reproduce(tables, "--variants", "vd") == 0  # resumes it: already at max_epochs, it just reports
    rows = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert rows[0]["status"] == "finished" and rows[0]["stopped_by"] == "max_epochs"
    assert "stopped by its time limit" not in (tables / "results" / "ptb-small.md").read_text()


def test_a_table_trained_in_stages_starts_each_from_the_one_before(tables):
    """paper.stages = 2 (PTB small in the paper): stage 2 starts from stage 1's best weights and is the cell."""
    for variant in ("vd", "real"):
        path = tables / "configs" / "ptb" / f"small-{variant}.toml"
        path.write_text(path.read_text().replace("[paper]\n", "[paper]\nstages = 2\n"))
    assert reproduce(tables, "--variants", "vd,real", "--jobs", "2", "--set", "train.max_epochs=1") == 0
    runs = tables / "runs" / "ptb-small"
    rows = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert [(row["variant"], row["stage"]) for row in rows] == [("vd", 2), ("real", 2)]
    for row in rows:
        stage1, stage2 = runs / row["variant"], runs / f"{row['variant']}-stage2"
        info = json.loads((stage2 / "run.json").read_text())
        assert info["init_from"]["checkpoint"] == str((stage1 / "best").resolve())
        assert row["valid"] == json.loads((stage2 / "final.json").read_text())["valid_ppl"]
        assert row["stage1_valid"] == json.loads((stage1 / "final.json").read_text())["valid_ppl"]
        assert (row["paper_valid"], row["paper_test"]) == PAPER[row["variant"]]
        assert [stage["key"] for stage in row["stage_rows"]] == [row["variant"], f"{row['variant']}-stage2"]
    text = (tables / "results" / "ptb-small.md").read_text()
    assert "## Training stages" in text and "| VD + RE + AL (REAL) | 2 of 2 |" in text
    assert f"--set train.init_from={runs / 'vd'}" in text
    # A fresh clone has the logs in results/ but no run folders: the tables come back the same.
    before = (tables / "results" / "ptb-small.json").read_text()
    runs.rename(tables / "elsewhere")
    assert reproduce(tables, "--variants", "vd,real", "--collect-only") == 0
    assert (tables / "results" / "ptb-small.json").read_text() == before


def test_another_stage_is_an_override_and_starts_from_the_last_one(tables):
    """--set paper.stages=3 (a candidate of the PTB-small protocol): stage 3 from stage 2's best weights; the
    finished stages are collected, not trained again."""
    path = tables / "configs" / "ptb" / "small-re.toml"
    path.write_text(path.read_text().replace("[paper]\n", "[paper]\nstages = 2\n"))
    assert reproduce(tables, "--variants", "re", "--set", "train.max_epochs=1") == 0
    runs = tables / "runs" / "ptb-small"
    stage2 = (runs / "re-stage2" / "final.json").read_text()
    assert reproduce(tables, "--variants", "re", "--set", "train.max_epochs=1", "--set", "paper.stages=3") == 0
    assert (runs / "re-stage2" / "final.json").read_text() == stage2
    info = json.loads((runs / "re-stage3" / "run.json").read_text())
    assert info["init_from"]["checkpoint"] == str((runs / "re-stage2" / "best").resolve())
    (row,) = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert (
        row["stage"] == 3 and row["valid"] == json.loads((runs / "re-stage3" / "final.json").read_text())["valid_ppl"]
    )


def test_a_later_stage_waits_for_the_one_before(tables):
    path = tables / "configs" / "ptb" / "small-re.toml"
    path.write_text(path.read_text().replace("[paper]\n", "[paper]\nstages = 2\n"))
    run = tables / "runs" / "ptb-small" / "re"
    assert main(["train", str(path), "--out", str(run), "--set", "train.max_epochs=1"]) == 0
    (run / "final.json").unlink()  # stage 1 interrupted after its last checkpoint
    assert reproduce(tables, "--variants", "re", "--collect-only") == 0
    (row,) = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert row["stage"] == 1 and row["status"] == "in progress" and row["valid"] is None
    assert "| VD + RE | 2 of 2 | — | — | — | — | no epoch yet |" in (tables / "results" / "ptb-small.md").read_text()
    assert (
        not row["next_stage_waiting"]
        and "stage 1 of 2: in progress" in (tables / "results" / "ptb-small.md").read_text()
    )


def test_a_finished_stage_is_not_called_in_progress_while_the_next_has_no_epoch(tables, capsys):
    path = tables / "configs" / "ptb" / "small-re.toml"
    path.write_text(path.read_text().replace("[paper]\n", "[paper]\nstages = 2\n"))
    run = tables / "runs" / "ptb-small" / "re"
    assert main(["train", str(path), "--out", str(run), "--set", "train.max_epochs=1"]) == 0  # stage 1 finished
    capsys.readouterr()
    assert reproduce(tables, "--variants", "re", "--collect-only") == 0
    assert "ptb-small/re: stage 1 finished, valid " in capsys.readouterr().out
    (row,) = json.loads((tables / "results" / "ptb-small.json").read_text())
    assert row["next_stage_waiting"] and row["valid"] is None and row["stage1_valid"] is not None
    page = (tables / "results" / "ptb-small.md").read_text()
    assert "stage 1 of 2 finished; stage 2 has no epoch yet" in page and "stage 1 of 2: in progress" not in page


@pytest.mark.parametrize("table", ["ptb-small"])  # wikitext-2-small's logs predate the collected config.json
def test_the_committed_table_regenerates_from_its_committed_logs(tmp_path, table):
    """A fresh clone (no run folders): `tiedlm reproduce TABLE --collect-only` rebuilds results/TABLE.json
    from the logs committed in results/TABLE/, the same numbers row for row."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    results = tmp_path / "results"
    shutil.copytree(root / "results" / table, results / table)
    argv = ["reproduce", table, "--configs", str(root / "configs"), "--runs", str(tmp_path / "no-runs")]
    assert main([*argv, "--results", str(results), "--collect-only"]) == 0
    committed = json.loads((root / "results" / f"{table}.json").read_text())
    rebuilt = json.loads((results / f"{table}.json").read_text())
    keys = ("variant", "valid", "test", "paper_valid", "paper_test", "epochs", "status", "stage1_valid", "stage1_test")
    assert [{k: r.get(k) for k in keys} for r in rebuilt] == [{k: r.get(k) for k in keys} for r in committed]
