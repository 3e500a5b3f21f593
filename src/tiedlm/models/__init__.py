"""Language-model architectures. Each returns ``(logits, new_state)`` from ``forward``."""

from tiedlm.config import ModelConfig
from tiedlm.models.lstm import LSTMLanguageModel


def build_model(config: ModelConfig, vocab_size: int) -> LSTMLanguageModel:
    """The model a config names, freshly initialised (call ``torch.manual_seed`` first)."""
    return LSTMLanguageModel(config, vocab_size)


__all__ = ["LSTMLanguageModel", "build_model"]
