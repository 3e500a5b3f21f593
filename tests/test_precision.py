"""Precision on every CPU: `auto` picks bf16 only where it is native; bf16 never crashes where it is emulated.

CI also runs the suite with the CPU capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2,
MKL_ENABLE_INSTRUCTIONS=AVX2, TIEDLM_CPU_ISA=avx2; see .ci/run), so that a bf16-native machine exercises
the AVX2 paths too.
"""

import json

import pytest
import torch

from tiedlm import precision
from tiedlm.cli import main
from tiedlm.config import ModelConfig
from tiedlm.models import build_model


@pytest.fixture
def avx2_only(monkeypatch):
    """Make tiedlm's probe see an AVX2-only CPU (what TIEDLM_CPU_ISA=avx2 does for a whole process)."""
    monkeypatch.setenv("TIEDLM_CPU_ISA", "avx2")
    precision.cpu_features.cache_clear()
    precision.fused_lstm_bf16_ok.cache_clear()
    yield
    precision.cpu_features.cache_clear()
    precision.fused_lstm_bf16_ok.cache_clear()


def test_auto_picks_fp32_where_bf16_is_emulated(avx2_only):
    chosen, why = precision.resolve_precision("auto", "cpu")
    assert chosen == "fp32"
    assert why.startswith("auto: ") and "no avx512_bf16/amx" in why and "TIEDLM_CPU_ISA=avx2" in why
    assert precision.resolve_precision("bf16", "cpu") == ("bf16", "set in the config")


def test_auto_follows_the_hardware_without_a_cap(monkeypatch):
    monkeypatch.delenv("TIEDLM_CPU_ISA", raising=False)
    precision.cpu_features.cache_clear()
    features = precision.cpu_features()
    expected = "bf16" if features.bf16_native else "fp32"
    assert precision.resolve_precision("auto", "cpu")[0] == expected
    has_it = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert features.bf16_native == (has_it and features.cap is None)


@pytest.mark.parametrize("cap", ["AVX2", "AVX512_CORE", "avx2_vnni"])
def test_a_onednn_cap_below_bf16_counts_as_emulated(monkeypatch, cap):
    monkeypatch.delenv("TIEDLM_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    precision.cpu_features.cache_clear()
    try:
        assert not precision.cpu_features().bf16_native
        assert f"ONEDNN_MAX_CPU_ISA={cap.upper()}" in precision.cpu_features().describe()
    finally:
        precision.cpu_features.cache_clear()


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_bf16_runs_the_fused_lstm_in_fp32_where_it_has_no_bf16_kernel(avx2_only, mode):
    config = ModelConfig(hidden_size=8, num_layers=2, dropout=0.3, dropout_mode=mode)
    model = build_model(config, 20)
    tokens = torch.randint(0, 20, (5, 3))
    state = model.init_state(3)
    for training in (True, False):  # training: the fast mode's fused layers; evaluation: both modes'
        model.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, (h, c) = model(tokens, state)
        assert logits.dtype == torch.bfloat16  # the decoder product stays bf16
        assert logits.shape == (5, 3, 20) and torch.isfinite(logits.float()).all()
        if not training or mode == "fast":
            assert h.dtype == c.dtype == torch.float32  # the LSTM ran outside autocast


def test_the_emulation_warning_is_one_line_and_said_once(avx2_only, capsys):
    precision._warned.clear()
    precision.warn_if_emulated("fp32", "cpu")
    assert capsys.readouterr().err == ""
    precision.warn_if_emulated("bf16", "cpu")
    precision.warn_if_emulated("bf16", "cpu")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tiedlm: warning: train.precision = bf16")
    assert "emulated" in err and "x slower than fp32 here" in err


def test_run_json_records_the_precision_chosen_and_why(avx2_only, tmp_path, config_file):
    run = tmp_path / "run"
    code = main(["train", str(config_file), "--out", str(run), "--set", "train.precision=auto",
                 "--set", "train.max_epochs=1"])  # fmt: skip
    assert code == 0
    info = json.loads((run / "run.json").read_text())
    assert info["precision"] == "fp32" and info["precision_reason"].startswith("auto: the CPU has")
    assert "no avx512_bf16/amx" in info["cpu_features"]
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["precision"] == "auto"  # the request is kept; each stretch records its choice
    # Resumed in bf16, the new stretch says so, from the epoch it starts at.
    assert main(["train", "--resume", str(run), "--set", "train.precision=bf16", "--set", "train.max_epochs=2"]) == 0
    (stretch,) = json.loads((run / "run.json").read_text())["resumed"]
    assert stretch["precision"] == "bf16" and stretch["from_epoch"] == 2
