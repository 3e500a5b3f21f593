"""A small causal Transformer language model with tied embeddings (the augmented loss beyond LSTMs).

Pre-LayerNorm blocks (``nn.TransformerEncoderLayer`` with a causal mask),
sinusoidal positions, the output layer tied to the embedding (no bias) or
untied. It keeps the LSTM's ``forward`` contract, ``(tokens, state) →
(logits, state)``, so training, evaluation, generation, scoring and the
augmented loss work unchanged. The state is a window of the previous
``context_size`` tokens of each stream: a window attends to them and to its own
earlier tokens, and they are recomputed rather than cached, so gradients never
cross a window boundary (like truncated BPTT). The state tensor is
(1, B, ≤ context_size) token ids.

Dropout is ordinary (not variational) dropout with probability ``model.dropout``
on the embeddings, the attention weights and the feed-forward layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from tiedlm.config import ModelConfig, value_range
from tiedlm.errors import TiedlmError
from tiedlm.models.base import LanguageModel, embedding_and_decoder_parameters, register
from tiedlm.models.common import output_layer

State = tuple[torch.Tensor]


@dataclass
class TransformerConfig(ModelConfig):
    """The Transformer's settings: attention heads, and how many previous tokens a window attends to.
    Its dropout is plain dropout (``dropout_mode`` is not read)."""

    unused = ("dropout_mode",)

    architecture: str = "transformer"
    num_heads: int = field(default=4, metadata=value_range(1))
    context_size: int = field(default=64, metadata=value_range(0))


def sinusoidal_positions(length: int, size: int, device, dtype) -> torch.Tensor:
    """(length, size) sine/cosine position codes (Vaswani et al. 2017)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, size, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / size))
    codes = torch.zeros(length, size, device=device)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency[: size // 2])
    return codes.to(dtype)


@register("transformer")
class TransformerLanguageModel(LanguageModel):
    """Its dropout draws from torch's RNG as it goes: ``window_masks`` is None, ``use_masks`` has no effect."""

    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig, vocab_size: int):
        super().__init__(config)
        size = config.hidden_size
        if size % config.num_heads:
            raise TiedlmError(f"model.hidden_size {size} is not divisible by model.num_heads {config.num_heads}")
        self.embedding = nn.Embedding(vocab_size, size)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                size, config.num_heads, 4 * size, config.dropout, activation="gelu", norm_first=True
            )
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(size)
        self.decoder = output_layer(self.embedding, config.tie_weights, config.has_output_bias())
        for name, parameter in self.named_parameters():
            if parameter.dim() > 1:
                nn.init.uniform_(parameter, -config.init_range, config.init_range)
            elif "norm" not in name:
                nn.init.zeros_(parameter)

    @classmethod
    def parameter_count(cls, config: TransformerConfig, vocab_size: int) -> int:
        h = (
            config.hidden_size
        )  # per block: attention 4H² + 4H, feed-forward 8H² + 5H, two LayerNorms 4H; final LayerNorm
        return embedding_and_decoder_parameters(config, vocab_size) + config.num_layers * (12 * h * h + 13 * h) + 2 * h

    @classmethod
    def forward_flops_per_token(cls, config: TransformerConfig, vocab_size: int, *, bptt: int) -> float:
        h = config.hidden_size  # per layer: QKV + output (4h²), FFN (8h²), attention over the context
        context = config.context_size + bptt / 2
        return config.num_layers * (2 * 12 * h * h + 2 * 2 * context * h) + 2 * h * vocab_size

    def init_state(self, batch_size: int) -> State:
        return (torch.zeros(1, batch_size, 0, dtype=torch.long, device=self.embedding.weight.device),)

    def features(self, tokens: torch.Tensor, state: State, *, masks: None = None) -> tuple[torch.Tensor, State]:
        """tokens (T, B) → the normalised top outputs (T, B, d); the state is the last context_size
        tokens of each stream."""
        memory = state[0][0].t().to(tokens.device)  # (M, B)
        sequence = torch.cat([memory, tokens])  # (M + T, B)
        length, size = sequence.size(0), self.config.hidden_size
        x = self.embedding(sequence) * math.sqrt(size)
        x = self.drop(x + sinusoidal_positions(length, size, x.device, x.dtype)[:, None, :])
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, src_mask=causal, is_causal=True)
        output = self.norm(x[memory.size(0) :])
        kept = sequence[-self.config.context_size :] if self.config.context_size else sequence[:0]
        return output, (kept.t().unsqueeze(0).contiguous(),)
