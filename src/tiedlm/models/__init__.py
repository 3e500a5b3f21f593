"""Language-model architectures. Each returns ``(logits, new_state)`` from ``forward``."""

from torch import nn

from tiedlm.config import ModelConfig
from tiedlm.errors import TiedlmError
from tiedlm.models.lstm import LSTMLanguageModel
from tiedlm.models.rhn import RHNLanguageModel
from tiedlm.models.transformer import TransformerLanguageModel

ARCHITECTURES = {"lstm": LSTMLanguageModel, "rhn": RHNLanguageModel, "transformer": TransformerLanguageModel}


def parameter_count(config: ModelConfig, vocab_size: int) -> int:
    """How many parameters ``build_model(config, vocab_size)`` has (tied matrices once), without building it.

    tests/test_validation.py checks it against the built models of every architecture.
    """
    h, v = config.hidden_size, vocab_size
    shared = v * h + (0 if config.tie_weights else v * h) + (v if config.has_output_bias() else 0)
    if config.architecture == "lstm":  # W_ih, W_hh (4H × H each) and their two biases, per layer
        return shared + config.num_layers * (8 * h * h + 8 * h)
    if config.architecture == "rhn":  # [W_H; W_T], then [R_H; R_T] and [b_H; b_T] per micro-step
        return shared + 2 * h * h + config.depth * (2 * h * h + 2 * h)
    # transformer: attention 4H² + 4H, feed-forward 8H² + 5H, two LayerNorms 4H, per block; final LayerNorm
    return shared + config.num_layers * (12 * h * h + 13 * h) + 2 * h


def build_model(config: ModelConfig, vocab_size: int) -> nn.Module:
    """The model a config names, freshly initialised (call ``torch.manual_seed`` first).

    A model whose fp32 weights would not fit in the memory available is refused before
    anything is allocated, and an allocation that fails anyway is reported the same way:
    a :class:`TiedlmError` naming ``model.hidden_size`` and the sizes, not a traceback.
    """
    from tiedlm.runtime import available_memory

    count = parameter_count(config, vocab_size)
    available = available_memory()
    if available is not None and 4 * count > available:
        raise _too_large(config, vocab_size, count, available)
    try:
        return ARCHITECTURES[config.architecture](config, vocab_size)
    except (MemoryError, RuntimeError) as exc:  # torch: "DefaultCPUAllocator: can't allocate memory"
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower():
            raise
        raise _too_large(config, vocab_size, count, available) from None


def _too_large(config: ModelConfig, vocab_size: int, count: int, available: int | None) -> TiedlmError:
    layers = (
        f"model.depth = {config.depth}" if config.architecture == "rhn" else f"model.num_layers = {config.num_layers}"
    )
    memory = f"the {available / 2**30:.1f} GiB of memory available" if available else "the memory available"
    return TiedlmError(
        f"model.hidden_size = {config.hidden_size}: with {layers} and |V| = {vocab_size} the model has "
        f"{count:,} parameters, {4 * count / 2**30:,.1f} GiB in fp32, more than {memory}"
    )


__all__ = ["LSTMLanguageModel", "RHNLanguageModel", "TransformerLanguageModel", "build_model", "parameter_count"]
