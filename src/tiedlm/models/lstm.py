"""The VD-LSTM language model of Inan et al. (2017), with optional tied weights.

    tokens (T, B) → embedding L (T, B, d) → [LSTM layer]×n → dropout → logits W·h + b (T, B, |V|)

Variational dropout (docs/method.md §4): mask m_0 on the embedded inputs and one mask
m_l per layer l, drawn once per window. The dropped output of layer l,
h_l ⊙ m_l, is both the recurrent input of layer l at the next step and the
input of layer l+1 (the top layer's goes to the decoder), so one mask per
layer serves both uses:

    x_t ⊙ m_0 ──► layer 1 ──► h1_t ⊙ m_1 ──► layer 2 ──► h2_t ⊙ m_2 ──► W·(.)
                    ▲             │            ▲             │
                    └─ h1_{t-1}⊙m_1            └─ h2_{t-1}⊙m_2

``exact`` runs that with per-sequence masks in a Python loop over time
(:class:`MaskedLSTMLayer`: the input projection of all steps is one matrix product,
the backward pass hand-written); ``fast`` shares
each mask across the batch, which lets the recurrent mask be folded into the
columns of W_hh and the fused LSTM kernel run unchanged. In evaluation both
modes are the same deterministic network on the fused kernel.

With ``tie_weights`` the decoder weight *is* the embedding matrix (RE). Tied or
not, the decoder may have a bias b (``model.output_bias``: by default only an
untied one, docs/method.md §2), exposed as ``model.output_bias``;
``include_bias=False`` gives the bias-free W·h the augmented loss needs. Hidden
size must equal embedding size for tying, which it always does here.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.func import functional_call

from tiedlm.config import Config, ModelConfig
from tiedlm.dropout import variational_mask
from tiedlm.layouts import transposed, weight_grad
from tiedlm.models.base import LanguageModel, embedding_and_decoder_parameters, register
from tiedlm.models.common import init_uniform, linear, output_layer
from tiedlm.precision import cpu_features, fused_lstm

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, B, H)


class NaiveLSTM(nn.Module):
    """The same LM written the obvious way, `tiedlm bench`'s reference: nn.LSTM, plain dropout, nn.Linear."""

    def __init__(self, config: Config, vocab_size: int):
        super().__init__()
        size, layers, p = config.model.hidden_size, config.model.num_layers, config.model.dropout
        self.embedding = nn.Embedding(vocab_size, size)
        self.lstm = nn.LSTM(size, size, layers, dropout=p if layers > 1 else 0.0)
        self.drop = nn.Dropout(p)
        self.decoder = output_layer(self.embedding, config.model.tie_weights, config.model.has_output_bias())
        init_uniform(self, config.model.init_range)

    def init_state(self, batch_size: int):
        shape = (self.lstm.num_layers, batch_size, self.lstm.hidden_size)
        weight = self.embedding.weight
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def forward(self, tokens, state):
        output, state = self.lstm(self.drop(self.embedding(tokens)), state)
        return nn.functional.linear(self.drop(output), self.decoder.weight), state  # bias-free; added in the loss


@register("lstm")
class LSTMLanguageModel(LanguageModel):
    """The VD-LSTM; its settings are exactly the shared ones (``ModelConfig``)."""

    config_class = ModelConfig
    naive_reference = NaiveLSTM

    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__(config)
        size = config.hidden_size
        self.embedding = nn.Embedding(vocab_size, size)
        self.layers = nn.ModuleList(nn.LSTM(size, size) for _ in range(config.num_layers))
        self.decoder = output_layer(self.embedding, config.tie_weights, config.has_output_bias())
        init_uniform(self, config.init_range)

    @classmethod
    def parameter_count(cls, config: ModelConfig, vocab_size: int) -> int:
        h = config.hidden_size  # W_ih, W_hh (4H × H each) and their two biases, per layer
        return embedding_and_decoder_parameters(config, vocab_size) + config.num_layers * (8 * h * h + 8 * h)

    @classmethod
    def forward_flops_per_token(cls, config: ModelConfig, vocab_size: int, *, bptt: int) -> float:
        h = config.hidden_size  # [W_ih W_hh] (4H × 2H) per layer, then the decoder
        return config.num_layers * 2 * (4 * h) * (2 * h) + 2 * h * vocab_size

    def init_state(self, batch_size: int) -> State:
        weight = self.embedding.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def features(
        self, tokens: torch.Tensor, state: State, *, masks: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, State]:
        """tokens (T, B) int64 → the top layer's dropped outputs (T, B, H) and the state after the last step."""
        x = self.embedding(tokens)  # (T, B, d)
        if self.training and self.config.dropout > 0:
            masks = self.window_masks(tokens) if masks is None else masks
            return self.run_layers(x, state, masks, fused=self.config.dropout_mode == "fast")
        return self.run_layers(x, state, None, fused=True)

    def decode(self, hidden: torch.Tensor, *, include_bias: bool = True) -> torch.Tensor:
        """W·h (+ b), its weight gradient in the faster GEMM layout on a CPU (models/common.linear)."""
        return linear(hidden, self.decoder.weight, self.decoder.bias if include_bias else None)

    def window_masks(self, tokens: torch.Tensor) -> list[torch.Tensor] | None:
        """m_0 … m_n of :meth:`sample_masks` for a window of ``tokens`` (T, B), exactly as forward draws them."""
        if not self.training or self.config.dropout <= 0:
            return None
        rows = 1 if self.config.dropout_mode == "fast" else tokens.size(1)
        weight = self.embedding.weight
        return self.sample_masks(rows, weight.device, weight.dtype)

    def sample_masks(self, rows: int, device, dtype) -> list[torch.Tensor]:
        """Masks m_0 (inputs) and m_1..m_n (layer outputs), each (rows, H)."""
        start, stop, draw = (0, rows, rows) if rows == 1 or self.mask_batch is None else self.mask_batch
        return [
            variational_mask(
                draw,
                self.config.hidden_size,
                self.config.dropout,
                generator=self.mask_generator,
                device=device,
                dtype=dtype,
            )[start:stop]
            for _ in range(self.config.num_layers + 1)
        ]

    def run_layers(
        self, x: torch.Tensor, state: State, masks: list[torch.Tensor] | None, *, fused: bool
    ) -> tuple[torch.Tensor, State]:
        """The LSTM stack on embedded inputs x (T, B, d) → (top output after dropout, new state).

        ``masks`` (see :meth:`sample_masks`) of shape (1, H) may use the fused
        kernel (``fused=True``); masks of shape (B, H) need the step loop.
        """
        h0, c0 = state
        new_h, new_c = [], []
        for index, lstm in enumerate(self.layers):
            hx = (h0[index : index + 1], c0[index : index + 1])
            if masks is None:
                x, (h, c) = fused_lstm(lstm, x, hx)
            else:
                x = x * masks[index]
                run = _fused_masked_layer if fused else _looped_masked_layer
                x, (h, c) = run(lstm, x, hx, masks[index + 1])
            new_h.append(h)
            new_c.append(c)
        if masks is not None:
            x = x * masks[-1]
        return x, (torch.cat(new_h), torch.cat(new_c))


def _fused_masked_layer(lstm: nn.LSTM, x: torch.Tensor, hx: State, mask: torch.Tensor):
    """One layer with a batch-shared recurrent mask (1, H), folded into W_hh's columns."""
    weight_hh = lstm.weight_hh_l0 * mask  # (4H, H) * (1, H): column j scaled by m_j
    return fused_lstm(lstm, x, hx, call=lambda x, hx: functional_call(lstm, {"weight_hh_l0": weight_hh}, (x, hx)))


def _looped_masked_layer(lstm: nn.LSTM, x: torch.Tensor, hx: State, mask: torch.Tensor):
    """One layer with a per-sequence recurrent mask (B, H) applied to h_{t-1} at every step."""
    weight = lstm.weight_hh_l0
    dtype = weight.dtype  # the state, the gates and their arithmetic stay in the parameters' dtype
    h0, c0, mask = hx[0][0].to(dtype), hx[1][0].to(dtype), mask.to(dtype)
    if x.is_cuda:  # TIEDLM_CUDA_CELL=on: one fused Triton kernel per step (tiedlm/cuda_cell.py), same maths
        from tiedlm.cuda_cell import recurrence_for

        fused = recurrence_for(x)
        if fused is not None:
            steps, batch, _ = x.shape
            bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
            gates_x = torch.addmm(bias, x.reshape(steps * batch, -1), lstm.weight_ih_l0.t()).view(steps, batch, -1)
            outputs, h, c = fused.apply(gates_x.to(dtype), h0, c0, weight, mask)
            return outputs, (h.unsqueeze(0), c.unsqueeze(0))
    outputs, h, c = MaskedLSTMLayer.apply(
        x, h0, c0, lstm.weight_ih_l0, weight, lstm.bias_ih_l0, lstm.bias_hh_l0, mask, product_dtype(x.device, dtype)
    )
    return outputs, (h.unsqueeze(0), c.unsqueeze(0))


def product_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the exact recurrence's matrix products: autocast's (bf16) where autocast is on and
    the hardware has it natively (on a CPU: AVX512_BF16 or AMX, see tiedlm.precision), else ``dtype``.

    Only the products: the cell state, the gates and the outputs stay in ``dtype`` (fp32), as do the
    gradients the backward pass carries from step to step; each product's result is rounded to bf16
    once before it joins them (CPU matmuls have no fp32 output for bf16 inputs).
    """
    if not torch.is_autocast_enabled(device.type):
        return dtype
    if device.type == "cpu" and not cpu_features().bf16_native:
        return dtype  # emulated bf16 products are ~50x slower than fp32: keep the recurrence in fp32
    return torch.get_autocast_dtype(device.type)


@functools.cache
def _packed_products_ok(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear with a pre-packed weight runs here for ``dtype`` (tried once, tiny)."""
    try:
        weight, x = torch.ones(8, 4, dtype=dtype), torch.ones(2, 4, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.equal(out.float(), torch.full((2, 8), 4.0)))


def _step_product(weight: torch.Tensor, rows: int):
    """x ↦ x·weightᵀ for the (rows, in) inputs x of every step of a window.

    On a CPU the weight is packed once per window for oneDNN's small-batch GEMM, which runs these
    (20, 650)·(650, 2600) products 20-30% faster than torch.mm (MKL) in fp32, with or without the
    AVX2 cap, and in bf16 (benchmarks/AVX2.md); elsewhere (and for fp64) it is torch.mm.
    """
    if (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and _packed_products_ok(weight.dtype)
    ):
        dense = weight if weight.is_contiguous() else transposed(weight.t())  # W_hhᵀ of the backward pass
        packed = torch.ops.mkldnn._reorder_linear_weight(dense, rows)
        onednn_linear = torch.ops.mkldnn._linear_pointwise
        return lambda x: onednn_linear(x, packed, None, "none", [], "")
    weight_t = weight.t()
    return lambda x: torch.mm(x, weight_t)


class MaskedLSTMLayer(torch.autograd.Function):
    """One LSTM layer with a fixed mask on h_{t-1}, with a hand-written BPTT backward.

    Inputs: x (T, B, D), h0 and c0 (B, H), the layer's W_ih (4H, D), W_hh (4H, H), b_ih and b_hh (4H,),
    the mask (B, H) or (1, H) and the dtype of the matrix products (see :func:`product_dtype`).
    Per step t (gate order i, f, g, o):

        a = x_t·W_ihᵀ + b_ih + b_hh + (h_{t-1} ⊙ m)·W_hhᵀ
        c_t = σ(a_f) ⊙ c_{t-1} + σ(a_i) ⊙ tanh(a_g)
        h_t = σ(a_o) ⊙ tanh(c_t)

    One autograd node for the whole layer and window instead of ~10 per step. The input projection
    of all steps is one product; the backward pass is one (B, 4H)·(4H, H) product per step, then one
    product each for the input's gradient and for W_ih's and W_hh's, and the gate derivatives that do
    not depend on the incoming gradient are formed for all steps at once, outside the loop.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, mask, product):
        steps, batch, _ = x.shape
        size = weight_hh.size(1)
        dtype = weight_hh.dtype
        with torch.autocast(x.device.type, enabled=False):
            w_ih, w_hh = weight_ih.to(product), weight_hh.to(product)
            inputs = x.reshape(steps * batch, -1).to(product)
            bias = bias_ih + bias_hh
            if product == dtype:
                acts = torch.addmm(bias, inputs, w_ih.t())
            else:  # bf16 product, fp32 sum: one pass
                acts = torch.add(torch.mm(inputs, w_ih.t()), bias)
            acts = acts.view(steps, batch, 4 * size)  # pre-activations, activated in place step by step
            cells = x.new_empty(steps, batch, size, dtype=dtype)
            tanh_cells = torch.empty_like(cells)
            outputs = torch.empty_like(cells)
            dropped = x.new_empty(steps, batch, size, dtype=product)  # h_{t-1} ⊙ m, what W_hh multiplies
            h, c = h0, c0
            recurrent = _step_product(w_hh, batch)
            for t in range(steps):
                a = acts[t]
                torch.mul(h, mask, out=dropped[t])
                a.add_(recurrent(dropped[t]))  # bf16 product + fp32 pre-activation: fp32
                a[:, : 2 * size].sigmoid_()
                a[:, 2 * size : 3 * size].tanh_()
                a[:, 3 * size :].sigmoid_()
                i, f, g, o = a.chunk(4, 1)
                c = torch.addcmul(f * c, i, g, out=cells[t])
                h = torch.mul(o, torch.tanh(c, out=tanh_cells[t]), out=outputs[t])
        ctx.save_for_backward(inputs, c0, w_ih, w_hh, mask, acts, cells, tanh_cells, dropped)
        ctx.x_dtype = x.dtype
        return outputs, h.clone(), c.clone()

    @staticmethod
    def backward(ctx, grad_outputs, grad_h, grad_c):
        inputs, c0, w_ih, w_hh, mask, acts, cells, tanh_cells, dropped = ctx.saved_tensors
        steps, batch, four_h = acts.shape
        size = four_h // 4
        dtype, product = acts.dtype, w_hh.dtype
        with torch.autocast(acts.device.type, enabled=False):
            i, f, g, o = acts.chunk(4, 2)  # (T, B, H) each, activated
            c_prev = torch.cat([c0.unsqueeze(0), cells[:-1]])
            # ∂a_i = dc·g·σ'(i), ∂a_f = dc·c_{t-1}·σ'(f), ∂a_g = dc·i·(1 − g²); ∂a_o = dh·tanh c·σ'(o);
            # and dc_t += dh_t·o·(1 − tanh² c_t): every factor but dc and dh, for all steps at once.
            factors = acts.new_empty(steps, batch, 3, size)
            torch.mul(g, i * (1 - i), out=factors[:, :, 0])
            torch.mul(c_prev, f * (1 - f), out=factors[:, :, 1])
            torch.mul(i, 1 - g * g, out=factors[:, :, 2])
            out_factor = tanh_cells * o * (1 - o)
            cell_factor = o * (1 - tanh_cells * tanh_cells)
            d_gates = torch.empty_like(acts)
            dh = grad_h.clone() if grad_h is not None else c0.new_zeros(c0.shape)
            dc = grad_c.clone() if grad_c is not None else c0.new_zeros(c0.shape)
            recurrent = _step_product(w_hh.t(), batch)  # d ↦ d·W_hh
            # The state carried in from the previous window is detached in training: then the
            # first step's products into h0 and c0 are skipped.
            want_state = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
            for t in range(steps - 1, -1, -1):
                if grad_outputs is not None:
                    dh += grad_outputs[t]
                dc.addcmul_(dh, cell_factor[t])
                d = d_gates[t]
                torch.mul(dc.unsqueeze(1), factors[t], out=d.view(batch, 4, size)[:, :3])
                torch.mul(dh, out_factor[t], out=d[:, 3 * size :])
                if t or want_state:
                    dc.mul_(f[t])
                    dh = torch.mul(recurrent(d.to(product)), mask)
            flat = d_gates.flatten(0, 1).to(product)
            grad_x = grad_w_ih = grad_w_hh = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = (flat @ w_ih).view(steps, batch, -1).to(ctx.x_dtype)
            if ctx.needs_input_grad[3]:
                grad_w_ih = weight_grad(flat, inputs).to(dtype)
            if ctx.needs_input_grad[4]:
                grad_w_hh = weight_grad(flat, dropped.flatten(0, 1)).to(dtype)
            if ctx.needs_input_grad[5] or ctx.needs_input_grad[6]:
                grad_b = d_gates.sum((0, 1))
        if not want_state:
            dh = dc = None
        return grad_x, dh, dc, grad_w_ih, grad_w_hh, grad_b, None if grad_b is None else grad_b.clone(), None, None
