"""The causal Transformer LM: causality, the token-window state, AL, training and resume, AdamW."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiedlm.cli import main
from tiedlm.config import load_config
from tiedlm.models import build_model
from tiedlm.models.transformer import TransformerConfig
from tiedlm.training import Trainer

ROOT = Path(__file__).resolve().parents[1]


def small(**changes) -> TransformerConfig:
    base = {"hidden_size": 16, "num_layers": 2, "num_heads": 2,
            "context_size": 100, "dropout": 0.0}  # fmt: skip
    return TransformerConfig(**{**base, **changes})


def test_a_position_never_sees_later_tokens():
    torch.manual_seed(0)
    model = build_model(small(), 30).eval()
    tokens = torch.randint(0, 30, (10, 2))
    changed = tokens.clone()
    changed[6:] = (changed[6:] + 1) % 30
    a, _ = model(tokens, model.init_state(2))
    b, _ = model(changed, model.init_state(2))
    torch.testing.assert_close(a[:6], b[:6])
    assert not torch.allclose(a[6:], b[6:])


def test_windows_with_state_equal_one_long_sequence():
    torch.manual_seed(1)
    model = build_model(small(), 30).eval()
    tokens = torch.randint(0, 30, (12, 3))
    whole, _ = model(tokens, model.init_state(3))
    for step in (1, 4):  # token by token (generation) and BPTT-like windows (evaluation)
        state, pieces = model.init_state(3), []
        for start in range(0, 12, step):
            logits, state = model(tokens[start : start + step], state)
            pieces.append(logits)
        torch.testing.assert_close(torch.cat(pieces), whole, atol=1e-5, rtol=1e-5)


def test_context_size_bounds_the_state():
    model = build_model(small(context_size=5), 30).eval()
    _, (state,) = model(torch.randint(0, 30, (9, 2)), model.init_state(2))
    assert state.shape == (1, 2, 5) and state.dtype == torch.long
    _, (state,) = build_model(small(context_size=0), 30).eval()(torch.randint(0, 30, (9, 2)), (state,))
    assert state.shape == (1, 2, 0)


def test_tied_and_untied_output():
    tied = build_model(small(), 30)
    assert tied.decoder.weight is tied.embedding.weight and tied.output_bias is None
    untied = build_model(small(tie_weights=False), 30)
    assert untied.decoder.weight is not untied.embedding.weight and untied.output_bias is not None


def transformer_config(path: Path, corpus: Path, augmented: bool = True) -> Path:
    path.write_text(
        f'name = "tiny-transformer"\nseed = 4\n[data]\ncorpus = "{corpus}"\nbatch_size = 4\nbptt = 6\n'
        'eval_batch_size = 2\n[model]\narchitecture = "transformer"\nhidden_size = 16\nnum_layers = 2\n'
        "num_heads = 2\ncontext_size = 6\ndropout = 0.1\ninit_range = 0.1\n"
        f"[loss]\naugmented = {str(augmented).lower()}\ntau = 5.0\ngamma = 0.5\ndetach_target = false\n"
        '[train]\noptimizer = "adamw"\nlr = 0.01\nweight_decay = 0.01\nmax_epochs = 2\ndevice = "cpu"\n'
    )
    return path


def test_trains_with_the_augmented_loss_and_resumes_bit_exactly(tmp_path, corpus_dir):
    config = transformer_config(tmp_path / "t.toml", corpus_dir)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", str(config), "--out", str(whole)]) == 0
    metrics = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["valid_ppl"] < metrics[0]["valid_ppl"] and metrics[0]["train_kl"] > 0
    assert main(["train", str(config), "--out", str(split), "--set", "train.max_epochs=1"]) == 0
    assert main(["train", "--resume", str(split), "--set", "train.max_epochs=2"]) == 0
    a, b = load_file(whole / "best" / "model.safetensors"), load_file(split / "best" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Generation and scoring use the same state contract.
    assert main(["generate", str(whole), "--prompt", "w1 w2", "--words", "5", "--seed", "1"]) == 0


def test_adamw_is_chosen_by_the_config(tmp_path, corpus_dir):
    trainer = Trainer(load_config(transformer_config(tmp_path / "t.toml", corpus_dir)), tmp_path / "run",
                      echo=lambda *a, **k: None)  # fmt: skip
    try:
        assert isinstance(trainer.optimizer, torch.optim.AdamW)
        assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.01
    finally:
        trainer._release()


def test_heads_must_divide_the_width():
    from tiedlm.errors import TiedlmError

    with pytest.raises(TiedlmError, match="not divisible by model.num_heads"):
        build_model(small(num_heads=3), 30)


def test_transformer_configs_load():
    for name in ("transformer-re", "transformer-real"):
        config = load_config(ROOT / "configs" / "ptb" / f"{name}.toml")
        model = build_model(config.model, 10_000)
        assert model.decoder.weight is model.embedding.weight
    assert load_config(ROOT / "configs" / "ptb" / "transformer-real.toml").loss.augmented
