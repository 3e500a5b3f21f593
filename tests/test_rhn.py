"""The Variational RHN: the highway micro-steps, Zilly's dropout masks, gradients, configs, training."""

import json
from pathlib import Path

import pytest
import torch

from tiedlm.bench import training_flops_per_token
from tiedlm.config import Config, TrainConfig, load_config
from tiedlm.models import build_model
from tiedlm.models.rhn import HighwayRecurrence, NaiveRHN, RHNConfig, RHNLanguageModel
from tiedlm.training import Trainer, learning_rate

ROOT = Path(__file__).resolve().parents[1]


def rhn_config(**changes) -> RHNConfig:
    base = {"hidden_size": 6, "num_layers": 1, "depth": 3, "init_range": 0.3}
    return RHNConfig(**{**base, **changes})


def reference_window(model: RHNLanguageModel, tokens, s, masks=None):
    """The model written out micro-step by micro-step, straight from docs/method.md §5."""
    n = model.config.hidden_size
    w_h, w_t = model.input_weight[:n], model.input_weight[n:]
    x = model.embedding(tokens)
    if masks is not None:
        x = x * masks["x"] * masks["i"]
    outputs = []
    for t in range(tokens.size(0)):
        for layer in range(model.config.depth):
            r_h, r_t = model.recurrent_weight[layer, :n], model.recurrent_weight[layer, n:]
            b_h, b_t = model.recurrent_bias[layer, :n], model.recurrent_bias[layer, n:]
            dropped = s if masks is None else s * masks["h"]
            first = layer == 0
            h = torch.tanh((x[t] @ w_h.T if first else 0) + dropped @ r_h.T + b_h)
            gate = torch.sigmoid((x[t] @ w_t.T if first else 0) + dropped @ r_t.T + b_t)
            s = h * gate + s * (1 - gate)  # the carry gate is 1 − t
        outputs.append(s)
    output = torch.stack(outputs)
    if masks is not None:
        output = output * masks["o"]
    logits = output @ model.decoder.weight.T
    return (logits if model.decoder.bias is None else logits + model.decoder.bias), s


def test_depth_one_without_dropout_is_one_highway_step():
    torch.manual_seed(0)
    model = build_model(rhn_config(depth=1), 11).eval()
    tokens = torch.tensor([[3], [5]])
    s0 = torch.randn(1, 1, 6)
    logits, (state,) = model(tokens, (s0,))
    # By hand: h = tanh(W_H x + R_H s + b_H), t = σ(W_T x + R_T s + b_T), s' = h t + s (1 − t).
    n, s = 6, s0[0]
    for token in (3, 5):
        x = model.embedding.weight[token]
        g = model.input_weight @ x + model.recurrent_weight[0] @ s[0] + model.recurrent_bias[0]
        h, gate = torch.tanh(g[:n]), torch.sigmoid(g[n:])
        s = (h * gate + s[0] * (1 - gate)).unsqueeze(0)
    torch.testing.assert_close(state[0], s)
    torch.testing.assert_close(logits[-1, 0], model.embedding.weight @ s[0])


def test_transform_bias_starts_at_minus_two_and_output_is_tied():
    model = build_model(rhn_config(), 20)
    assert torch.all(model.recurrent_bias[:, 6:] == -2.0)
    assert model.decoder.weight is model.embedding.weight and model.decoder.bias is None
    untied = build_model(rhn_config(tie_weights=False), 20)
    assert untied.decoder.weight is not untied.embedding.weight and untied.decoder.bias is not None


def test_the_window_equals_the_micro_step_reference_with_the_same_masks():
    torch.manual_seed(1)
    model = build_model(rhn_config(), 9).train()
    model.mask_generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 9, (5, 3))
    s0 = torch.randn(1, 3, 6)
    logits, (state,) = model(tokens, (s0,))
    model.mask_generator = torch.Generator().manual_seed(5)
    masks = model.sample_masks(tokens, torch.float32)
    expected_logits, expected_state = reference_window(model, tokens, s0[0], masks)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(state[0], expected_state)


def test_masks_are_per_sequence_and_constant_over_time_and_depth():
    torch.manual_seed(2)
    config = rhn_config(embedding_dropout=0.5, input_dropout=0.5, recurrent_dropout=0.5, output_dropout=0.5)
    model = build_model(config, 7).train()
    model.mask_generator = torch.Generator().manual_seed(0)
    tokens = torch.tensor([[1, 2], [1, 3], [4, 2], [1, 2]])  # word 1 repeats in sequence 0, word 2 in sequence 1
    masks = model.sample_masks(tokens, torch.float32)
    x = masks["x"][..., 0]
    assert x.shape == (4, 2)
    assert x[0, 0] == x[1, 0] == x[3, 0] and x[0, 1] == x[2, 1] == x[3, 1]  # a word is dropped everywhere
    assert set(x.unique().tolist()) <= {0.0, 2.0}
    for name in ("i", "h", "o"):  # one row per sequence, reused at every step (and every micro-step for h)
        assert masks[name].shape == (2, 6) and set(masks[name].unique().tolist()) <= {0.0, 2.0}
    # Different sequences get different word masks: over many draws they disagree somewhere.
    draws = torch.stack([model.sample_masks(torch.tensor([[1, 1]]), torch.float32)["x"][0, :, 0] for _ in range(40)])
    assert (draws[:, 0] != draws[:, 1]).any()
    # The recurrent mask multiplies s wherever it enters R: with h-mask zero, R has no effect at all.
    model.eval()
    masks = {"x": torch.ones(4, 2, 1), "i": torch.ones(2, 6), "h": torch.zeros(2, 6), "o": torch.ones(2, 6)}
    before = reference_window(model, tokens, torch.zeros(2, 6), masks)[0]
    with torch.no_grad():
        model.recurrent_weight.mul_(3)
    torch.testing.assert_close(reference_window(model, tokens, torch.zeros(2, 6), masks)[0], before)


def test_fast_mode_shares_masks_across_the_batch():
    model = build_model(rhn_config(dropout_mode="fast", embedding_dropout=0.5), 7).train()
    model.mask_generator = torch.Generator().manual_seed(0)
    masks = model.sample_masks(torch.tensor([[1, 1, 1]]), torch.float32)
    assert masks["h"].shape == (1, 6) and len(set(masks["x"][0, :, 0].tolist())) == 1


def test_gradient_of_the_micro_step_loop():
    torch.manual_seed(3)
    steps, batch, size, depth = 3, 2, 3, 2
    projected = torch.randn(steps, batch, 2 * size, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(batch, size, dtype=torch.float64, requires_grad=True)
    weight = (0.5 * torch.randn(depth, 2 * size, size, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(depth, 2 * size, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[2.0, 0.0, 2.0], [0.0, 2.0, 2.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: HighwayRecurrence.apply(*a, mask), (projected, s0, weight, bias))


def test_model_gradients_match_autograd_through_the_reference():
    torch.manual_seed(4)
    model = build_model(rhn_config(tie_weights=False), 9).double().eval()
    tokens = torch.randint(0, 9, (4, 2))
    s0 = torch.randn(1, 2, 6, dtype=torch.float64)
    logits, _ = model(tokens, (s0,))
    grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
    reference, _ = reference_window(model, tokens, s0[0])
    expected = torch.autograd.grad(reference.square().sum(), list(model.parameters()), allow_unused=True)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want if want is not None else torch.zeros_like(got))


def test_full_size_configs_have_about_23m_parameters():
    for name in ("rhn-re", "rhn-real"):
        config = load_config(ROOT / "configs" / "ptb" / f"{name}.toml")
        model = build_model(config.model, 10_000)
        count = sum(p.numel() for p in model.parameters())
        n, depth = 830, 10
        assert count == 10_000 * n + 2 * n * n + depth * (2 * n * n + 2 * n)
        assert 22.5e6 < count < 24e6
        assert config.train.weight_decay == 1e-7 and config.train.clip == 10.0 and config.model.depth == 10
    assert load_config(ROOT / "configs" / "ptb" / "rhn-real.toml").loss.augmented


def test_zilly_schedule_constant_then_divided_by_1_02():
    config = load_config(ROOT / "configs" / "ptb" / "rhn-re.toml").train
    assert [learning_rate(config, e) for e in (1, 20)] == [0.2, 0.2]
    for epoch in (21, 22, 60):
        assert learning_rate(config, epoch) == pytest.approx(0.2 / 1.02 ** (epoch - 20), rel=1e-12)
    assert learning_rate(TrainConfig(lr=1.0, lr_decay=0.5, lr_decay_start=2), 3) == 0.25  # any model can use it


def write_rhn_config(path: Path, corpus: Path, **train) -> Path:
    extra = "".join(f"{key} = {value}\n" for key, value in train.items())
    path.write_text(
        f'name = "tiny-rhn"\nseed = 2\n[data]\ncorpus = "{corpus}"\nbatch_size = 4\nbptt = 6\neval_batch_size = 2\n'
        '[model]\narchitecture = "rhn"\nhidden_size = 10\nnum_layers = 1\ndepth = 2\ninit_range = 0.1\n'
        "embedding_dropout = 0.1\ninput_dropout = 0.2\nrecurrent_dropout = 0.1\noutput_dropout = 0.2\n"
        '[loss]\naugmented = true\ntau = 5.0\ngamma = 0.5\n[train]\nlr = 1.0\nmax_epochs = 2\ndevice = "cpu"\n' + extra
    )
    return path


def test_rhn_trains_with_al_and_resumes_bit_exactly(tmp_path, corpus_dir):
    from tiedlm.cli import main

    config = write_rhn_config(tmp_path / "rhn.toml", corpus_dir, weight_decay=1e-4)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", str(config), "--out", str(whole)]) == 0
    metrics = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["valid_ppl"] < metrics[0]["valid_ppl"] and "train_kl" in metrics[0]
    assert main(["train", str(config), "--out", str(split), "--set", "train.max_epochs=1"]) == 0
    assert main(["train", "--resume", str(split), "--set", "train.max_epochs=2"]) == 0
    from safetensors.torch import load_file

    a, b = load_file(whole / "best" / "model.safetensors"), load_file(split / "best" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weight_decay_reaches_the_optimizer(tmp_path, corpus_dir):
    config = load_config(write_rhn_config(tmp_path / "rhn.toml", corpus_dir, weight_decay=0.01))
    trainer = Trainer(config, tmp_path / "run", echo=lambda *a, **k: None)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.01
    trainer._release()


def test_naive_reference_is_the_same_function():
    # With every dropout off, the naive loop computes the same logits from the same weights.
    config = Config(model=rhn_config(embedding_dropout=0, input_dropout=0, recurrent_dropout=0, output_dropout=0))
    torch.manual_seed(0)
    naive = NaiveRHN(config, 9)
    model = build_model(config.model, 9)
    n = 6
    with torch.no_grad():
        model.embedding.weight.copy_(naive.embedding.weight)
        model.input_weight.copy_(torch.cat([naive.input_h.weight, naive.input_t.weight]))
        for layer in range(3):
            model.recurrent_weight[layer].copy_(torch.cat([naive.micro_h[layer].weight, naive.micro_t[layer].weight]))
            model.recurrent_bias[layer].copy_(torch.cat([naive.micro_h[layer].bias, naive.micro_t[layer].bias]))
    tokens = torch.randint(0, 9, (4, 2))
    expected, _ = naive(tokens, naive.init_state(2))
    got, _ = model.eval()(tokens, model.init_state(2), include_bias=False)
    torch.testing.assert_close(got, expected)
    assert n == config.model.hidden_size
    flops = training_flops_per_token(config, 9, 0.5)
    assert flops == 3 * (2 * 12 * 6 * (1 + 3) + 2 * 6 * 9)
