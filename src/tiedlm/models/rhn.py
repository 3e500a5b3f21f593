"""Variational Recurrent Highway Network language model (Zilly et al. 2017; docs/method.md §5).

One recurrent layer of width n and recurrence depth D. Per time step t the
state s passes through D highway micro-steps l = 1..D:

    g_l = [W_H; W_T] x_t · [l = 1] + [R_H^l; R_T^l] (s ⊙ m_h) + [b_H^l; b_T^l]
    h = tanh(g_l[:n]),  t = σ(g_l[n:])           (transform-gate bias b_T starts at −2)
    s ← h ⊙ t + s ⊙ (1 − t)                      (coupled carry gate c = 1 − t)

and the output of step t is s after micro-step D. The input enters only the
first micro-step. Dropout (Zilly's variational dropout, per sequence):

    x  whole-word embedding dropout: a word dropped from a sequence is zeroed at
       every position it occurs in that sequence (one Bernoulli per word type)
    i  on the embedded input, one mask per sequence for all time steps
    h  on the state where it enters R, the same mask at every time step and every
       micro-step
    o  on the output, one mask per sequence for all time steps

All masks are inverted (scaled by 1/keep), so evaluation needs no change. The
decoder is tied to the embedding (no bias) or untied, and ``forward`` follows
the same contract as the LSTM: ``(logits, new_state)``, with ``include_bias=False``
for the bias-free W·s the augmented loss needs.

The micro-step loop is one autograd node per window (:class:`HighwayRecurrence`)
with a hand-written BPTT backward: one (B, n)·(n, 2n) product per micro-step
forward and one (B, 2n)·(2n, n) product backward, and one product per depth for
the whole gradient of R.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tiedlm.config import Config, ModelConfig, value_range
from tiedlm.dropout import variational_mask
from tiedlm.models.base import LanguageModel, embedding_and_decoder_parameters, register
from tiedlm.models.common import init_uniform, output_layer

State = tuple[torch.Tensor]


@dataclass
class RHNConfig(ModelConfig):
    """The RHN's settings (Zilly et al.; docs/method.md §5): recurrence depth, the four drop probabilities
    (x: whole words, i: input, h: recurrent, o: output) and the transform-gate bias at start. It is one
    recurrent layer (``num_layers`` is not read) and ``dropout`` gives way to the four."""

    unused = ("dropout",)

    architecture: str = "rhn"
    depth: int = field(default=10, metadata=value_range(1))
    embedding_dropout: float = field(default=0.25, metadata=value_range(0.0, 1.0, high_open=True))
    input_dropout: float = field(default=0.75, metadata=value_range(0.0, 1.0, high_open=True))
    recurrent_dropout: float = field(default=0.25, metadata=value_range(0.0, 1.0, high_open=True))
    output_dropout: float = field(default=0.75, metadata=value_range(0.0, 1.0, high_open=True))
    transform_bias: float = -2.0


class NaiveRHN(nn.Module):
    """The RHN written the obvious way (as in Zilly et al.'s code): separate H and T products per
    micro-step, autograd through the loop, the four dropouts drawn with plain tensor ops."""

    def __init__(self, config: Config, vocab_size: int):
        super().__init__()
        model = config.model
        size = model.hidden_size
        self.config = model
        self.embedding = nn.Embedding(vocab_size, size)
        self.input_h, self.input_t = nn.Linear(size, size, bias=False), nn.Linear(size, size, bias=False)
        self.micro_h = nn.ModuleList(nn.Linear(size, size) for _ in range(model.depth))
        self.micro_t = nn.ModuleList(nn.Linear(size, size) for _ in range(model.depth))
        self.decoder = output_layer(self.embedding, model.tie_weights, model.has_output_bias())
        init_uniform(self, model.init_range)
        for layer in self.micro_t:
            nn.init.constant_(layer.bias, model.transform_bias)

    def init_state(self, batch_size: int):
        return (self.embedding.weight.new_zeros(1, batch_size, self.config.hidden_size),)

    def forward(self, tokens, state):
        config = self.config
        steps, batch = tokens.shape
        size = config.hidden_size

        def mask(shape, p):
            keep = 1.0 - (p if self.training else 0.0)
            return torch.bernoulli(torch.full(shape, keep, device=tokens.device)) / keep

        words = mask((batch, self.embedding.num_embeddings), config.embedding_dropout)
        word_mask = words.gather(1, tokens.t()).t().unsqueeze(-1)
        x = self.embedding(tokens) * word_mask * mask((batch, size), config.input_dropout)
        h_mask, o_mask = mask((batch, size), config.recurrent_dropout), mask((batch, size), config.output_dropout)
        s, outputs = state[0][0], []
        for t in range(steps):
            for layer in range(config.depth):
                dropped = s * h_mask
                g_h, g_t = self.micro_h[layer](dropped), self.micro_t[layer](dropped)
                if layer == 0:
                    g_h, g_t = g_h + self.input_h(x[t]), g_t + self.input_t(x[t])
                gate = torch.sigmoid(g_t)
                s = torch.tanh(g_h) * gate + s * (1 - gate)
            outputs.append(s)
        output = torch.stack(outputs) * o_mask
        return nn.functional.linear(output, self.decoder.weight), (s.unsqueeze(0),)  # bias-free, as in bench


@register("rhn")
class RHNLanguageModel(LanguageModel):
    config_class = RHNConfig
    naive_reference = NaiveRHN

    def __init__(self, config: RHNConfig, vocab_size: int):
        super().__init__(config)
        size, depth = config.hidden_size, config.depth
        self.embedding = nn.Embedding(vocab_size, size)
        self.input_weight = nn.Parameter(torch.empty(2 * size, size))  # [W_H; W_T], first micro-step only
        self.recurrent_weight = nn.Parameter(torch.empty(depth, 2 * size, size))  # [R_H^l; R_T^l]
        self.recurrent_bias = nn.Parameter(torch.empty(depth, 2 * size))  # [b_H^l; b_T^l]
        self.decoder = output_layer(self.embedding, config.tie_weights, config.has_output_bias())
        init_uniform(self, config.init_range)
        with torch.no_grad():
            self.recurrent_bias[:, size:].fill_(config.transform_bias)

    @classmethod
    def parameter_count(cls, config: RHNConfig, vocab_size: int) -> int:
        h = config.hidden_size  # [W_H; W_T], then [R_H; R_T] and [b_H; b_T] per micro-step
        return embedding_and_decoder_parameters(config, vocab_size) + 2 * h * h + config.depth * (2 * h * h + 2 * h)

    @classmethod
    def forward_flops_per_token(cls, config: RHNConfig, vocab_size: int, *, bptt: int) -> float:
        h = config.hidden_size  # the input projection, D micro-steps, the decoder
        return 2 * (2 * h) * h * (1 + config.depth) + 2 * h * vocab_size

    @classmethod
    def size_setting(cls, config: RHNConfig) -> str:
        return f"model.depth = {config.depth}"

    def init_state(self, batch_size: int) -> State:
        return (self.embedding.weight.new_zeros(1, batch_size, self.config.hidden_size),)

    def sample_masks(self, tokens: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
        """Per-window masks: x (T, B, 1) from per-sequence word types; i, h, o (rows, n)."""
        config, device = self.config, tokens.device
        rows = 1 if config.dropout_mode == "fast" else tokens.size(1)
        vocab_size, size = self.embedding.num_embeddings, config.hidden_size
        start, stop, draw = (0, rows, rows) if rows == 1 or self.mask_batch is None else self.mask_batch

        def mask(features: int, p: float) -> torch.Tensor:
            drawn = variational_mask(draw, features, p, generator=self.mask_generator, device=device, dtype=dtype)
            return drawn[start:stop]

        word_mask = mask(vocab_size, config.embedding_dropout)  # (rows, |V|): one draw per word type
        columns = torch.arange(tokens.size(1), device=device) if rows > 1 else torch.zeros_like(tokens[0])
        return {
            "x": word_mask[columns.expand_as(tokens), tokens].unsqueeze(-1),  # (T, B, 1)
            "i": mask(size, config.input_dropout),
            "h": mask(size, config.recurrent_dropout),
            "o": mask(size, config.output_dropout),
        }

    def window_masks(self, tokens: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The masks of :meth:`sample_masks` for a training window; None in evaluation."""
        return self.sample_masks(tokens, self.embedding.weight.dtype) if self.training else None

    def features(self, tokens: torch.Tensor, state: State, *, masks: dict | None = None) -> tuple[torch.Tensor, State]:
        """tokens (T, B) int64 → the top states after output dropout (T, B, n) and the state after the
        last step; ``masks`` from :meth:`window_masks` (None draws them here)."""
        x = self.embedding(tokens)  # (T, B, n)
        dtype = self.recurrent_weight.dtype
        masks = (self.window_masks(tokens) if masks is None else masks) if self.training else None
        if masks is not None:
            x = x * masks["x"] * masks["i"]
        steps, batch, size = x.shape
        projected = (x.reshape(steps * batch, size) @ self.input_weight.t()).view(steps, batch, 2 * size)
        recurrent_mask = masks["h"].to(dtype) if masks is not None else x.new_ones(1, size, dtype=dtype)
        # Like the LSTM's cell state, the highway state stays fp32 under bf16 autocast.
        outputs, last = HighwayRecurrence.apply(
            projected.to(dtype), state[0][0].to(dtype), self.recurrent_weight, self.recurrent_bias, recurrent_mask
        )
        if masks is not None:
            outputs = outputs * masks["o"]
        return outputs, (last.unsqueeze(0),)


class HighwayRecurrence(torch.autograd.Function):
    """The RHN micro-step loop over a window, with a hand-written BPTT backward.

    Inputs: projected (T, B, 2n) = x_t·[W_H; W_T]ᵀ, s0 (B, n), R (D, 2n, n), b (D, 2n),
    mask (B, n) or (1, n) on s where it enters R. Returns the states after the
    last micro-step of every time step (T, B, n) and the final state (B, n).
    """

    @staticmethod
    def forward(ctx, projected, s0, weight, bias, mask):
        steps, batch, two_n = projected.shape
        depth, size = weight.size(0), two_n // 2
        acts = projected.new_empty(steps, depth, batch, two_n)  # tanh(g_H), σ(g_T) of every micro-step
        before = projected.new_empty(steps, depth, batch, size)  # s entering every micro-step
        outputs = projected.new_empty(steps, batch, size)
        weights_t = [weight[layer].t() for layer in range(depth)]
        s = s0
        for t in range(steps):
            for layer in range(depth):
                before[t, layer] = s
                g = torch.addmm(bias[layer], s * mask, weights_t[layer], out=acts[t, layer])
                if layer == 0:
                    g += projected[t]
                g[:, :size].tanh_()
                g[:, size:].sigmoid_()
                h, gate = g[:, :size], g[:, size:]
                s = torch.addcmul(s, gate, h - s)  # h ⊙ t + s ⊙ (1 − t)
            outputs[t] = s
        ctx.save_for_backward(acts, before, weight, mask)
        return outputs, s.clone()

    @staticmethod
    def backward(ctx, grad_outputs, grad_last):
        acts, before, weight, mask = ctx.saved_tensors
        steps, depth, batch, two_n = acts.shape
        size = two_n // 2
        d_gates = torch.empty_like(acts)
        ds = grad_last.clone() if grad_last is not None else before.new_zeros(batch, size)
        for t in range(steps - 1, -1, -1):
            if grad_outputs is not None:
                ds += grad_outputs[t]
            for layer in range(depth - 1, -1, -1):
                h, gate = acts[t, layer, :, :size], acts[t, layer, :, size:]
                s_prev = before[t, layer]
                d_h, d_gate = d_gates[t, layer, :, :size], d_gates[t, layer, :, size:]
                torch.mul(ds * gate, 1 - h * h, out=d_h)
                torch.mul(ds * (h - s_prev), gate * (1 - gate), out=d_gate)
                ds = torch.addcmul(ds * (1 - gate), torch.mm(d_gates[t, layer], weight[layer]), mask)
        grad_weight = torch.einsum("tlbg,tlbn->lgn", d_gates, before * mask)
        grad_bias = d_gates.sum(dim=(0, 2))
        return d_gates[:, 0], ds, grad_weight, grad_bias, None
