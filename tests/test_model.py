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


def _layer_inputs(steps, batch, size, dtype, seed, inputs=None):
    generator = torch.Generator().manual_seed(seed)
    inputs = inputs or size
    tensors = [
        torch.randn(steps, batch, inputs, dtype=dtype, generator=generator),  # x
        torch.randn(batch, size, dtype=dtype, generator=generator),  # h0
        torch.randn(batch, size, dtype=dtype, generator=generator),  # c0
        torch.randn(4 * size, inputs, dtype=dtype, generator=generator) / inputs**0.5,  # W_ih
        torch.randn(4 * size, size, dtype=dtype, generator=generator) / size**0.5,  # W_hh
        torch.randn(4 * size, dtype=dtype, generator=generator),  # b_ih
        torch.randn(4 * size, dtype=dtype, generator=generator),  # b_hh
    ]
    mask = (torch.rand(batch, size, generator=generator) > 0.5).to(dtype) * 2
    return [t.requires_grad_() for t in tensors], mask


def _plain_layer(x, h, c, w_ih, w_hh, b_ih, b_hh, mask):
    """docs/method.md §1 / PyTorch's LSTM with the mask on h_{t-1}, written out (autograd differentiates it)."""
    outputs = []
    for t in range(x.size(0)):
        i, f, g, o = (x[t] @ w_ih.t() + b_ih + b_hh + (h * mask) @ w_hh.t()).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), h, c


def test_masked_lstm_layer_gradcheck():
    from tiedlm.models.lstm import MaskedLSTMLayer

    inputs, mask = _layer_inputs(4, 3, 5, torch.float64, seed=0, inputs=6)
    assert torch.autograd.gradcheck(lambda *a: MaskedLSTMLayer.apply(*a, mask, torch.float64), inputs)


def test_masked_lstm_layer_matches_the_lstm_equations_and_their_autograd():
    from tiedlm.models.lstm import MaskedLSTMLayer

    inputs, mask = _layer_inputs(6, 2, 4, torch.float32, seed=1, inputs=3)
    ours = MaskedLSTMLayer.apply(*inputs, mask, torch.float32)
    plain = _plain_layer(*inputs, mask)
    torch.testing.assert_close(ours, plain)
    weights = [torch.randn_like(t) for t in ours]  # a loss that reaches every output
    grads = [
        torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out, strict=True)), inputs)
        for out in (ours, plain)
    ]
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_recurrence_tracks_the_fp32_recurrence():
    # Under bf16 autocast (where bf16 is native) the layer's matrix products run in bf16 while
    # the cell state, the gates and the step-to-step gradients stay fp32: the outputs and every
    # gradient stay within bf16 rounding of the fp32 layer's.
    from tiedlm.models.lstm import MaskedLSTMLayer

    inputs, mask = _layer_inputs(35, 4, 32, torch.float32, seed=2)
    results = []
    for product in (torch.float32, torch.bfloat16):
        out = MaskedLSTMLayer.apply(*inputs, mask, product)
        assert all(t.dtype == torch.float32 for t in out)
        loss = out[0].square().sum() + out[1].sum() + out[2].sum()
        results.append((out, torch.autograd.grad(loss, inputs)))
    (fp32_out, fp32_grads), (bf16_out, bf16_grads) = results
    for a, b in zip(fp32_out, bf16_out, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0.03)
        assert not torch.equal(a, b)  # the products really ran in bf16
    names = ("x", "h0", "c0", "W_ih", "W_hh", "b_ih", "b_hh")
    for name, a, b in zip(names, fp32_grads, bf16_grads, strict=True):
        assert (b - a).norm() <= 0.03 * a.norm(), name


def test_exact_layer_uses_bf16_products_only_where_bf16_is_native(monkeypatch):
    from tiedlm import precision
    from tiedlm.models.lstm import product_dtype

    cpu = torch.device("cpu")
    assert product_dtype(cpu, torch.float32) == torch.float32  # no autocast
    for native in (True, False):
        features = precision.CpuFeatures("AVX512" if native else "AVX2", native, False, None)
        monkeypatch.setattr("tiedlm.models.lstm.cpu_features", lambda features=features: features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert product_dtype(cpu, torch.float32) == (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("bias", [True, False])
def test_decoder_product_has_the_gradients_of_f_linear(bias):
    # tiedlm.models.common.linear forms W's gradient in another GEMM layout on a CPU in fp32 (tiedlm/layouts.py).
    from tiedlm.models.common import linear

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 8, generator=generator, requires_grad=True)
    weight = torch.randn(11, 8, generator=generator, requires_grad=True)
    b = torch.randn(11, generator=generator, requires_grad=True) if bias else None
    leaves = [x, weight] + ([b] if bias else [])
    upstream = torch.randn(5, 3, 11, generator=generator)
    ours = linear(x, weight, b)
    assert "_Linear" in type(ours.grad_fn.next_functions[0][0]).__name__  # the custom product ran
    plain = torch.nn.functional.linear(x, weight, b)
    torch.testing.assert_close(ours, plain)
    grads = [torch.autograd.grad((out * upstream).sum(), leaves) for out in (ours, plain)]
    torch.testing.assert_close(grads[0], grads[1])
    assert all(g.is_contiguous() for g in grads[0])


@pytest.mark.parametrize("shape", [(7, 5), (3, 1300), (650, 1025)])  # one block, several, a short last one
def test_blocked_transpose_is_the_transpose(shape):
    from tiedlm.layouts import TRANSPOSE_BLOCK, transposed

    matrix = torch.randn(*shape)
    out = transposed(matrix)
    assert out.is_contiguous() and out.shape == shape[::-1] and torch.equal(out, matrix.t())
    assert TRANSPOSE_BLOCK < 1025  # the last two shapes do go through the blocks


def test_tied_model_gradients_match_autograd_of_the_plain_model():
    # The whole exact-mask model (hand-written layer backward, decoder product) against the same
    # network written with autograd ops only, masks and all, in float64.
    torch.manual_seed(0)
    model = make(dropout=0.3, tie_weights=True, output_bias="on").double().train()
    model.mask_generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, V, (T, B))
    state = tuple(s.double() for s in model.init_state(B))
    logits, _ = model(tokens, state)
    upstream = torch.randn_like(logits)
    ours = torch.autograd.grad((logits * upstream).sum(), list(model.parameters()))
    model.mask_generator = torch.Generator().manual_seed(4)
    masks = model.sample_masks(B, "cpu", torch.float64)
    x = model.embedding(tokens) * masks[0]
    for index, lstm in enumerate(model.layers):
        x, _, _ = _plain_layer(x, state[0][index], state[1][index], lstm.weight_ih_l0, lstm.weight_hh_l0,
                               lstm.bias_ih_l0, lstm.bias_hh_l0, masks[index + 1])  # fmt: skip
        x = x * masks[index + 1]
    plain_logits = torch.nn.functional.linear(x, model.decoder.weight, model.decoder.bias)
    torch.testing.assert_close(logits, plain_logits)
    plain = torch.autograd.grad((plain_logits * upstream).sum(), list(model.parameters()))
    torch.testing.assert_close(ours, plain)
