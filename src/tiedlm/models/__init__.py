"""Language-model architectures, one file each; every one is a :class:`LanguageModel` (models/base.py)
registered under its ``model.architecture`` name, and returns ``(logits, new_state)`` from ``forward``
(the top outputs h instead of logits with ``decode=False``)."""

import importlib
import pkgutil

from torch import nn

from tiedlm.config import ModelConfig, field_default, settings, table_fields
from tiedlm.errors import TiedlmError
from tiedlm.models.base import ARCHITECTURES, LanguageModel, register
from tiedlm.models.lstm import LSTMLanguageModel
from tiedlm.models.rhn import RHNConfig, RHNLanguageModel
from tiedlm.models.transformer import TransformerConfig, TransformerLanguageModel

# Every other module of this package registers itself on import: a new architecture is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def parameter_count(config: ModelConfig, vocab_size: int) -> int:
    """How many parameters ``build_model(config, vocab_size)`` has (tied matrices once), without building it.

    tests/test_validation.py checks it against the built models of every architecture.
    """
    architecture = ARCHITECTURES[config.architecture]
    return architecture.parameter_count(architecture.settings(config), vocab_size)


def build_model(config: ModelConfig, vocab_size: int) -> nn.Module:
    """The model a config names, freshly initialised (call ``torch.manual_seed`` first).

    A model whose fp32 weights would not fit in the memory available is refused before
    anything is allocated, and an allocation that fails anyway is reported the same way:
    a :class:`TiedlmError` naming ``model.hidden_size`` and the sizes, not a traceback.
    """
    from tiedlm.runtime import available_memory

    architecture = ARCHITECTURES[config.architecture]
    config = architecture.settings(config)
    count = architecture.parameter_count(config, vocab_size)
    available = available_memory()
    if available is not None and 4 * count > available:
        raise _too_large(config, vocab_size, count, available)
    try:
        return architecture(config, vocab_size)
    except (MemoryError, RuntimeError) as exc:  # torch: "DefaultCPUAllocator: can't allocate memory"
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower():
            raise
        raise _too_large(config, vocab_size, count, available) from None


def _too_large(config: ModelConfig, vocab_size: int, count: int, available: int | None) -> TiedlmError:
    layers = ARCHITECTURES[config.architecture].size_setting(config)
    memory = f"the {available / 2**30:.1f} GiB of memory available" if available else "the memory available"
    return TiedlmError(
        f"model.hidden_size = {config.hidden_size}: with {layers} and |V| = {vocab_size} the model has "
        f"{count:,} parameters, {4 * count / 2**30:,.1f} GiB in fp32, more than {memory}"
    )


__all__ = [
    "ARCHITECTURES",
    "LSTMLanguageModel",
    "LanguageModel",
    "RHNConfig",
    "RHNLanguageModel",
    "TransformerConfig",
    "TransformerLanguageModel",
    "build_model",
    "field_default",
    "parameter_count",
    "register",
    "settings",
    "table_fields",
]
