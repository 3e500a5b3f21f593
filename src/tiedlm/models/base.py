"""The contract every language model keeps, and the registry that maps ``model.architecture`` to it.

A model is a :class:`LanguageModel` subclass decorated with ``@register("NAME")``; its
``config_class`` holds its settings (a :class:`ModelConfig` subclass, or ModelConfig itself).
The rest of tiedlm reads only what is written here:

    model(tokens, state, include_bias=True, masks=None) → (logits, state)   tokens (T, B), logits (T, B, |V|)
    model.features(tokens, state, masks=None) → (h, state)   what a model implements: the top outputs
                                     h (T, B, d) that the decoder reads; ``model(..., decode=False)``
                                     returns them (the trainer then runs decoder and loss as one node)
    model.init_state(B)              the state before the first window: a tuple of tensors, B in dimension 1
    model.embedding, model.decoder   L (|V|, d) and the output layer (its weight is L when tied)
    model.output_bias                the decoder's bias or None; ``include_bias=False`` leaves it out
                                     of the logits (the augmented loss needs the bias-free W·h)
    model.use_masks(generator, ...)  where the window's dropout masks are drawn from
    model.window_masks(tokens)       one window's masks, drawn ahead (None: the model has none to draw)
    Model.parameter_count(config, |V|), Model.forward_flops_per_token(config, |V|, bptt=T)

The registry also decides which keys of the flat ``[model]`` table belong to which architecture
(tiedlm.config reads and writes that table through its MODEL_SETTINGS, which :func:`register` fills).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from tiedlm.config import MODEL_SETTINGS, ModelConfig

ARCHITECTURES: dict[str, type[LanguageModel]] = {}  # model.architecture → class, in registration order


def register(name: str):
    """Class decorator: make ``model.architecture = NAME`` build this class (with its ``config_class``)."""

    def add(cls: type[LanguageModel]) -> type[LanguageModel]:
        default = cls.config_class.__dataclass_fields__["architecture"].default
        if cls.config_class is not ModelConfig and default != name:
            raise TypeError(f"{cls.config_class.__name__} needs `architecture: str = {name!r}` (it has {default!r})")
        cls.architecture = name
        ARCHITECTURES[name] = cls
        MODEL_SETTINGS[name] = cls.config_class  # what tiedlm.config reads a [model] table into
        return cls

    return add


class LanguageModel(nn.Module):
    """Base of every architecture (see the module docstring for the contract)."""

    architecture: ClassVar[str]  # set by @register
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    embedding: nn.Embedding
    decoder: nn.Linear

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Where variational masks come from (see :meth:`use_masks`); a model without any keeps them unused.
        self.mask_generator: torch.Generator | None = None
        self.mask_batch: tuple[int, int, int] | None = None

    @classmethod
    def settings(cls, config: ModelConfig) -> ModelConfig:
        """``config`` as this architecture's ``config_class`` (a plain ModelConfig gets its defaults)."""
        if isinstance(config, cls.config_class):
            return config
        shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)}
        return cls.config_class(**shared)

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self.decoder.bias

    def forward(
        self, tokens: torch.Tensor, state: tuple, *, include_bias: bool = True, masks: Any = None, decode: bool = True
    ) -> tuple[torch.Tensor, tuple]:
        """tokens (T, B) int64 → logits (T, B, |V|) and the state after the last step.

        ``include_bias=False`` returns the bias-free W·h that the augmented loss needs; ``decode=False``
        the top outputs h (T, B, d) instead of logits. ``masks`` (training only): the window's masks
        from :meth:`window_masks` (the captured training step draws them outside its CUDA graph);
        None draws them here.
        """
        hidden, state = self.features(tokens, state, masks=masks)
        return (self.decode(hidden, include_bias=include_bias) if decode else hidden), state

    def features(self, tokens: torch.Tensor, state: tuple, *, masks: Any = None) -> tuple[torch.Tensor, tuple]:
        """The top outputs h (T, B, d), after any output dropout, and the state after the last step."""
        raise NotImplementedError

    def decode(self, hidden: torch.Tensor, *, include_bias: bool = True) -> torch.Tensor:
        """Logits W·h + b (T, B, |V|) of the top outputs h (T, B, d); W·h alone without ``include_bias``.

        Always exactly this product (an override may only change how it is computed): the trainer
        forms W·h + b itself, fused with the cross-entropy, from ``decode=False``'s outputs."""
        return nn.functional.linear(hidden, self.decoder.weight, self.decoder.bias if include_bias else None)

    def init_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def use_masks(self, generator: torch.Generator, batch: tuple[int, int, int] | None = None) -> None:
        """Draw the dropout masks from ``generator`` (the trainer seeds it, checkpoints save it).

        ``batch`` = (start, stop, B) under data parallelism: masks are drawn for all B streams and
        rows start:stop kept, so every rank sees the masks one process would (see distributed.py).
        """
        self.mask_generator, self.mask_batch = generator, batch

    def window_masks(self, tokens: torch.Tensor) -> Any:
        """The dropout masks of one training window of ``tokens`` (T, B), as ``forward(masks=...)`` takes
        them; None where there are none to draw ahead (evaluation, or dropout from torch's own RNG)."""
        return None

    @classmethod
    def parameter_count(cls, config: ModelConfig, vocab_size: int) -> int:
        """How many parameters the model has (tied matrices once), without building it."""
        raise NotImplementedError

    @classmethod
    def forward_flops_per_token(cls, config: ModelConfig, vocab_size: int, *, bptt: int) -> float:
        """Matrix-product FLOPs of one token's forward pass, decoder included (tiedlm bench)."""
        raise NotImplementedError

    @classmethod
    def size_setting(cls, config: ModelConfig) -> str:
        """The setting that scales the model besides hidden_size, as an error message names it."""
        return f"model.num_layers = {config.num_layers}"

    # The same model written the obvious way, for `tiedlm bench`'s comparison (None: there is none);
    # built as ``naive_reference(config: Config, vocab_size)``.
    naive_reference: ClassVar[type[nn.Module] | None] = None


def embedding_and_decoder_parameters(config: ModelConfig, vocab_size: int) -> int:
    """L, the decoder's weight when untied, and its bias when it has one."""
    h, v = config.hidden_size, vocab_size
    return v * h + (0 if config.tie_weights else v * h) + (v if config.has_output_bias() else 0)
