import pytest
import torch

from tiedlm.config import ModelConfig
from tiedlm.models import LSTMLanguageModel, build_model
from tiedlm.models.lstm import _looped_masked_layer

V, H, T, B = 17, 8, 5, 3


def make(**overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(hidden_size=H, **overrides), V)


def test_tied_model_shares_one_matrix_and_has_no_bias():
    model = make(tie_weights=True)
    assert model.decoder.weight is model.embedding.weight
    assert model.decoder.bias is None and model.output_bias is None
    names = [name for name, _ in model.named_parameters()]
    assert "decoder.weight" not in names  # registered once


def test_untied_model_has_its_own_weight_and_bias():
    model = make(tie_weights=False)
    assert model.decoder.weight is not model.embedding.weight
    assert model.decoder.bias is not None and model.decoder.bias.shape == (V,)


@pytest.mark.parametrize(
    ("tie", "setting", "has_bias"),
    [(True, "auto", False), (False, "auto", True), (True, "on", True), (False, "off", False)],
)
def test_output_bias_setting(tie, setting, has_bias):
    model = make(tie_weights=tie, output_bias=setting)
    assert (model.decoder.bias is not None) == has_bias
    assert (model.decoder.weight is model.embedding.weight) == tie


def test_tied_model_with_a_bias_round_trips_through_a_checkpoint(tmp_path):
    from tiedlm.checkpoint import load_checkpoint, save_checkpoint
    from tiedlm.config import Config
    from tiedlm.data import Vocabulary

    config = Config()
    config.model = ModelConfig(hidden_size=H, output_bias="on")
    model = build_model(config.model, V)
    with torch.no_grad():
        model.decoder.bias.copy_(torch.arange(V, dtype=torch.float32))
    vocab = Vocabulary([f"w{i}" for i in range(V)])
    save_checkpoint(tmp_path / "ckpt", model, config, vocab)
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert loaded.decoder.weight is loaded.embedding.weight
    torch.testing.assert_close(loaded.decoder.bias, model.decoder.bias)
    torch.testing.assert_close(loaded.embedding.weight, model.embedding.weight)


def test_uniform_init_within_range():
    model = make(init_range=0.05, tie_weights=False)
    for name, parameter in model.named_parameters():
        assert parameter.abs().max() <= 0.05, name
        assert parameter.abs().max() > 0.04, name  # actually spread over the range


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_forward_returns_logits_and_state(mode):
    model = make(dropout_mode=mode)
    tokens = torch.randint(0, V, (T, B))
    logits, (h, c) = model(tokens, model.init_state(B))
    assert logits.shape == (T, B, V)
    assert h.shape == c.shape == (2, B, H)


def test_bias_free_logits_for_the_augmented_loss():
    model = make(tie_weights=False).eval()
    tokens = torch.randint(0, V, (T, B))
    with_bias, _ = model(tokens, model.init_state(B))
    without, _ = model(tokens, model.init_state(B), include_bias=False)
    torch.testing.assert_close(with_bias - without, model.decoder.bias.expand_as(with_bias))


def test_masks_are_per_sequence_in_exact_and_batch_shared_in_fast():
    model = make(dropout=0.5)
    exact = model.sample_masks(B, "cpu", torch.float32)
    fast = model.sample_masks(1, "cpu", torch.float32)
    assert len(exact) == 3 and all(m.shape == (B, H) for m in exact)
    assert all(m.shape == (1, H) for m in fast)
    assert set(torch.cat(exact).unique().tolist()) <= {0.0, 2.0}  # inverted dropout scaling
    assert not torch.equal(exact[1][0], exact[1][1])  # sequences get different masks


def test_exact_mask_is_the_same_at_every_time_step():
    # With W_hh = 0 and the forget gate shut (bias -1e4), h_t depends only on x_t ⊙ m,
    # so a constant input must give the same output at every step, and a dropped
    # input unit must give the output of a zero input.
    model = make(dropout=0.5).train()
    model.mask_generator = torch.Generator().manual_seed(0)
    lstm = model.layers[0]
    with torch.no_grad():
        lstm.weight_hh_l0.zero_()
        lstm.weight_ih_l0.copy_(torch.eye(H).repeat(4, 1))
        lstm.bias_ih_l0[H : 2 * H] = -1e4
        model.embedding.weight.fill_(1.0)
    tokens = torch.zeros(T, B, dtype=torch.long)
    masks = model.sample_masks(B, "cpu", torch.float32)
    layer1, _ = _looped_masked_layer(lstm, model.embedding(tokens) * masks[0], (torch.zeros(1, B, H),) * 2, masks[1])
    for t in range(1, T):
        assert torch.equal(layer1[t], layer1[0])
    zero_input, _ = _looped_masked_layer(lstm, torch.zeros(1, B, H), (torch.zeros(1, B, H),) * 2, masks[1])
    dropped = masks[0] == 0
    assert dropped.any() and (~dropped).any()
    assert torch.equal(layer1[0][dropped], zero_input[0][dropped])
    assert not torch.equal(layer1[0][~dropped], zero_input[0][~dropped])


def test_fast_equals_exact_with_a_batch_shared_mask():
    model = make(dropout=0.4).train()
    tokens = torch.randint(0, V, (T, B))
    x = model.embedding(tokens)
    shared = model.sample_masks(1, "cpu", torch.float32)
    state = model.init_state(B)
    fused, (h1, c1) = model.run_layers(x, state, shared, fused=True)
    looped, (h2, c2) = model.run_layers(x, state, [m.expand(B, H) for m in shared], fused=False)
    torch.testing.assert_close(fused, looped)
    torch.testing.assert_close((h1, c1), (h2, c2))


def test_dropout_off_loop_equals_fused_kernel():
    model = make(dropout=0.0)
    tokens = torch.randint(0, V, (T, B))
    x = model.embedding(tokens)
    ones = [torch.ones(B, H) for _ in range(3)]
    looped, _ = model.run_layers(x, model.init_state(B), ones, fused=False)
    fused, _ = model.run_layers(x, model.init_state(B), None, fused=True)
    torch.testing.assert_close(looped, fused)


def test_one_mask_per_layer_serves_recurrence_and_next_layer():
    # Zeroing unit j of mask m_1 must remove h1_j from both layer 1's recurrence and
    # layer 2's input: then the gradient of everything w.r.t. weight_hh_l0[:, j] of
    # layer 1 and weight_ih_l0[:, j] of layer 2 vanishes.
    model = make(dropout=0.0)
    tokens = torch.randint(0, V, (T, B))
    masks = [torch.ones(B, H) for _ in range(3)]
    masks[1][:, 2] = 0.0
    out, _ = model.run_layers(model.embedding(tokens), model.init_state(B), masks, fused=False)
    out.sum().backward()
    assert model.layers[0].weight_hh_l0.grad[:, 2].abs().max() == 0
    assert model.layers[1].weight_ih_l0.grad[:, 2].abs().max() == 0
    assert model.layers[0].weight_hh_l0.grad[:, 3].abs().max() > 0


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_evaluation_is_deterministic_and_mode_independent(mode):
    model = make(dropout_mode=mode, dropout=0.5).eval()
    reference = make(dropout_mode="exact", dropout=0.5).eval()
    tokens = torch.randint(0, V, (T, B))
    a, _ = model(tokens, model.init_state(B))
    b, _ = reference(tokens, reference.init_state(B))
    torch.testing.assert_close(a, b)


def test_state_carried_across_windows_equals_one_long_window():
    model = make().eval()
    tokens = torch.randint(0, V, (2 * T, B))
    whole, _ = model(tokens, model.init_state(B))
    first, state = model(tokens[:T], model.init_state(B))
    second, _ = model(tokens[T:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)


def test_training_mode_draws_fresh_masks_per_window():
    model = make(dropout=0.5).train()
    model.mask_generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (T, B))
    a, _ = model(tokens, model.init_state(B))
    b, _ = model(tokens, model.init_state(B))
    assert not torch.equal(a, b)
    assert isinstance(model, LSTMLanguageModel)


def test_masked_recurrence_gradcheck():
    from tiedlm.models.lstm import MaskedRecurrence

    generator = torch.Generator().manual_seed(0)
    steps, batch, size = 4, 3, 5
    inputs = [
        torch.randn(steps, batch, 4 * size, dtype=torch.float64, generator=generator, requires_grad=True),
        torch.randn(batch, size, dtype=torch.float64, generator=generator, requires_grad=True),
        torch.randn(batch, size, dtype=torch.float64, generator=generator, requires_grad=True),
        torch.randn(4 * size, size, dtype=torch.float64, generator=generator, requires_grad=True),
    ]
    mask = (torch.rand(batch, size, generator=generator) > 0.5).double() * 2
    assert torch.autograd.gradcheck(lambda *a: MaskedRecurrence.apply(*a, mask), inputs)


def test_masked_recurrence_matches_the_lstm_equations():
    from tiedlm.models.lstm import MaskedRecurrence

    generator = torch.Generator().manual_seed(1)
    steps, batch, size = 6, 2, 4
    gates_x = torch.randn(steps, batch, 4 * size, dtype=torch.float64, generator=generator)
    weight = torch.randn(4 * size, size, dtype=torch.float64, generator=generator)
    mask = (torch.rand(batch, size, generator=generator) > 0.5).double() * 2
    h = c = torch.zeros(batch, size, dtype=torch.float64)
    expected = []
    for t in range(steps):  # docs/method.md §1 / PyTorch's LSTM, written out
        i, f, g, o = (gates_x[t] + (h * mask) @ weight.t()).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        expected.append(h)
    outputs, h_last, c_last = MaskedRecurrence.apply(gates_x, torch.zeros_like(h), torch.zeros_like(c), weight, mask)
    torch.testing.assert_close(outputs, torch.stack(expected))
    torch.testing.assert_close((h_last, c_last), (h, c))
