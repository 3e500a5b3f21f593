"""Data-parallel training with torchrun (gloo, 2 CPU processes) equals one process with the whole batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from tiedlm.cli import main

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def torchrun(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tiedlm", *args]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def weights(folder):
    return load_file(folder / "model.safetensors")


def assert_close_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture
def batch20(tmp_path, corpus_dir):
    path = write_config(tmp_path / "c.toml", corpus_dir)
    path.write_text(path.read_text().replace("batch_size = 4", "batch_size = 20"))
    return path


@pytest.mark.parametrize("augmented", [True, False])
def test_one_step_of_two_ranks_equals_one_process(tmp_path, corpus_dir, augmented):
    config = write_config(tmp_path / "c.toml", corpus_dir, augmented=augmented)
    config.write_text(config.read_text().replace("batch_size = 4", "batch_size = 20"))
    one_step = ["--set", "train.max_epochs=1", "--set", "train.max_steps_per_epoch=1"]
    assert main(["train", str(config), "--out", str(tmp_path / "single"), *one_step]) == 0
    done = torchrun("train", str(config), "--out", str(tmp_path / "ddp"), *one_step, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    single = weights(tmp_path / "single" / "checkpoints" / "epoch-0001")
    ddp = weights(tmp_path / "ddp" / "checkpoints" / "epoch-0001")
    before = weights(tmp_path / "single" / "checkpoints" / "epoch-0000")
    assert any(not torch.equal(single[k], before[k]) for k in single)  # the step changed something
    assert_close_weights(ddp, single)
    # Only rank 0 wrote: one metrics line per epoch, one final report on stdout.
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and done.stdout.count('"event": "final"') == 1
    single_metrics = json.loads((tmp_path / "single" / "metrics.jsonl").read_text())
    assert json.loads(lines[0])["train_ppl"] == pytest.approx(single_metrics["train_ppl"], rel=1e-5)


def test_ddp_run_resumes_and_matches_one_process(tmp_path, batch20):
    epochs = ["--set", "train.max_steps_per_epoch=3"]
    assert main(["train", str(batch20), "--out", str(tmp_path / "single"), *epochs]) == 0  # 2 epochs
    first = torchrun("train", str(batch20), "--out", str(tmp_path / "ddp"), "--set", "train.max_epochs=1",
                     *epochs, cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun("train", "--resume", str(tmp_path / "ddp"), "--set", "train.max_epochs=2", *epochs,
                      cwd=tmp_path)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert_close_weights(weights(tmp_path / "ddp" / "best"), weights(tmp_path / "single" / "best"))
    info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert len(info["resumed"]) == 1
    # A DDP run can also be continued by one process (checkpoints do not depend on the world size).
    assert main(["train", "--resume", str(tmp_path / "ddp"), "--set", "train.max_epochs=3", *epochs]) == 0


def test_batch_must_split_evenly(tmp_path, corpus_dir):
    config = write_config(tmp_path / "c.toml", corpus_dir)
    config.write_text(config.read_text().replace("batch_size = 4", "batch_size = 5"))
    done = torchrun("train", str(config), "--out", str(tmp_path / "ddp"), cwd=tmp_path)
    assert done.returncode != 0
    assert "data.batch_size: 5 streams cannot be split evenly over 2 ranks" in done.stderr


def test_sigterm_stops_all_ranks_after_the_same_window(tmp_path, batch20):
    import signal
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "tiedlm", "train", str(batch20), "--out", str(run), "--set", "train.max_epochs=200",
               "--set", "train.patience=200"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    stopped = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"]
    assert 1 <= stopped < 200, err[-2000:]
    for checkpoint in (run / "checkpoints").glob("epoch-*+*"):  # stopped inside an epoch (not during validation)
        state = load_file(checkpoint / "trainer_state.safetensors")
        assert state["state.0"].shape == (2, 20, 12)  # 2 layers, all 20 streams gathered from both ranks
    # The checkpoint holds the whole batch's state; one process continues the run from it.
    assert main(["train", "--resume", str(run), "--set", f"train.max_epochs={stopped + 1}"]) == 0
    final = json.loads((run / "final.json").read_text())
    assert final["epochs"] == stopped + 1
