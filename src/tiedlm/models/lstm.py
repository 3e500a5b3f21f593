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
(the input projection of all steps is one matrix product); ``fast`` shares
each mask across the batch, which lets the recurrent mask be folded into the
columns of W_hh and the fused LSTM kernel run unchanged. In evaluation both
modes are the same deterministic network on the fused kernel.

With ``tie_weights`` the decoder weight *is* the embedding matrix (RE), and
``model.output_bias`` decides whether it has a bias (docs/method.md §2); hidden
size must then equal embedding size, which it always does here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from tiedlm.config import ModelConfig
from tiedlm.dropout import variational_mask
from tiedlm.models.common import init_uniform, output_layer
from tiedlm.precision import fused_lstm

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, B, H)


class LSTMLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        size = config.hidden_size
        self.embedding = nn.Embedding(vocab_size, size)
        self.layers = nn.ModuleList(nn.LSTM(size, size) for _ in range(config.num_layers))
        self.decoder = output_layer(self.embedding, config.tie_weights, config.has_output_bias())
        init_uniform(self, config.init_range)
        self.mask_generator: torch.Generator | None = None  # set by the trainer for reproducible masks
        # Under data parallelism: (start, stop, B). Masks are drawn for all B streams and rows
        # start:stop kept, so every rank sees the masks one process would (see distributed.py).
        self.mask_batch: tuple[int, int, int] | None = None

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self.decoder.bias

    def init_state(self, batch_size: int) -> State:
        weight = self.embedding.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def forward(
        self, tokens: torch.Tensor, state: State, *, include_bias: bool = True, masks: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, State]:
        """tokens (T, B) int64 → logits (T, B, |V|) and the state after the last step.

        ``include_bias=False`` returns the bias-free W·h that the augmented loss needs.
        ``masks`` (training only): the window's masks, drawn beforehand with :meth:`sample_masks`
        (the captured training step draws them outside its CUDA graph); None draws them here.
        """
        x = self.embedding(tokens)  # (T, B, d)
        if self.training and self.config.dropout > 0:
            rows = 1 if self.config.dropout_mode == "fast" else tokens.size(1)
            if masks is None:
                masks = self.sample_masks(rows, x.device, x.dtype)
            h = self.run_layers(x, state, masks, fused=self.config.dropout_mode == "fast")
        else:
            h = self.run_layers(x, state, None, fused=True)
        output, new_state = h
        bias = self.decoder.bias if include_bias else None
        logits = nn.functional.linear(output, self.decoder.weight, bias)  # (T, B, |V|)
        return logits, new_state

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
    steps, batch, _ = x.shape
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    # The input projection of all time steps in one matrix product.
    gates_x = torch.addmm(bias, x.reshape(steps * batch, -1), lstm.weight_ih_l0.t()).view(steps, batch, -1)
    # The recurrence keeps its state and arithmetic in the parameters' dtype (fp32) even under
    # bf16 autocast: the cell state accumulates over every step of the window.
    dtype = lstm.weight_hh_l0.dtype
    recurrence = MaskedRecurrence
    if gates_x.is_cuda:  # TIEDLM_CUDA_CELL=on: one fused Triton kernel per step (tiedlm/cuda_cell.py), same maths
        from tiedlm.cuda_cell import recurrence_for

        recurrence = recurrence_for(gates_x) or MaskedRecurrence
    outputs, h, c = recurrence.apply(
        gates_x.to(dtype), hx[0][0].to(dtype), hx[1][0].to(dtype), lstm.weight_hh_l0, mask.to(dtype)
    )
    return outputs, (h.unsqueeze(0), c.unsqueeze(0))


class MaskedRecurrence(torch.autograd.Function):
    """The LSTM recurrence with a fixed mask on h_{t-1}, with a hand-written BPTT backward.

    Inputs: gates_x (T, B, 4H) = x_t·W_ihᵀ + b for all steps, h0 and c0 (B, H),
    W_hh (4H, H) and the mask (B, H) or (1, H). Per step t (gate order i, f, g, o):

        a = gates_x[t] + (h_{t-1} ⊙ m)·W_hhᵀ
        c_t = σ(a_f) ⊙ c_{t-1} + σ(a_i) ⊙ tanh(a_g)
        h_t = σ(a_o) ⊙ tanh(c_t)

    One autograd node for the whole window instead of ~10 per step: the
    backward pass is one (B, 4H)·(4H, H) product per step plus one product for
    the whole W_hh gradient.
    """

    @staticmethod
    def forward(ctx, gates_x, h0, c0, weight_hh, mask):
        steps, batch, four_h = gates_x.shape
        size = four_h // 4
        acts = torch.empty_like(gates_x)  # activated gates σ(i), σ(f), tanh(g), σ(o)
        cells = gates_x.new_empty(steps, batch, size)
        outputs = gates_x.new_empty(steps, batch, size)
        h, c = h0, c0
        weight_t = weight_hh.t()
        for t in range(steps):
            a = torch.addmm(gates_x[t], h * mask, weight_t, out=acts[t])
            a[:, : 2 * size].sigmoid_()
            a[:, 2 * size : 3 * size].tanh_()
            a[:, 3 * size :].sigmoid_()
            i, f, g, o = a.chunk(4, 1)
            c = torch.addcmul(f * c, i, g, out=cells[t])
            h = torch.mul(o, torch.tanh(c), out=outputs[t])
        ctx.save_for_backward(acts, cells, outputs, h0, c0, weight_hh, mask)
        return outputs, h.clone(), c.clone()

    @staticmethod
    def backward(ctx, grad_outputs, grad_h, grad_c):
        acts, cells, outputs, h0, c0, weight_hh, mask = ctx.saved_tensors
        steps, batch, four_h = acts.shape
        d_gates = torch.empty_like(acts)
        dh = grad_h.clone() if grad_h is not None else h0.new_zeros(h0.shape)
        dc = grad_c.clone() if grad_c is not None else c0.new_zeros(c0.shape)
        for t in range(steps - 1, -1, -1):
            if grad_outputs is not None:
                dh += grad_outputs[t]
            i, f, g, o = acts[t].chunk(4, 1)
            tanh_c = torch.tanh(cells[t])
            c_prev = cells[t - 1] if t else c0
            dc += dh * o * (1 - tanh_c * tanh_c)
            d_i, d_f, d_g, d_o = d_gates[t].chunk(4, 1)
            torch.mul(dc * g, i * (1 - i), out=d_i)
            torch.mul(dc * c_prev, f * (1 - f), out=d_f)
            torch.mul(dc * i, 1 - g * g, out=d_g)
            torch.mul(dh * tanh_c, o * (1 - o), out=d_o)
            dc = dc * f
            dh = torch.mm(d_gates[t], weight_hh) * mask
        h_prev = torch.cat([h0.unsqueeze(0), outputs[:-1]]) * mask  # (T, B, H): what W_hh multiplied
        grad_weight = d_gates.flatten(0, 1).t() @ h_prev.flatten(0, 1)
        return d_gates, dh, dc, grad_weight, None
