"""Language-model architectures. Each returns ``(logits, new_state)`` from ``forward``."""

from torch import nn

from tiedlm.config import ModelConfig
from tiedlm.models.lstm import LSTMLanguageModel
from tiedlm.models.rhn import RHNLanguageModel
from tiedlm.models.transformer import TransformerLanguageModel

ARCHITECTURES = {"lstm": LSTMLanguageModel, "rhn": RHNLanguageModel, "transformer": TransformerLanguageModel}


def build_model(config: ModelConfig, vocab_size: int) -> nn.Module:
    """The model a config names, freshly initialised (call ``torch.manual_seed`` first)."""
    return ARCHITECTURES[config.architecture](config, vocab_size)


__all__ = ["LSTMLanguageModel", "RHNLanguageModel", "TransformerLanguageModel", "build_model"]
