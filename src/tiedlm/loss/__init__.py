"""Cross-entropy and the augmented loss of Inan et al. 2017 (docs/method.md §3).

    augmented.py  AugmentedLoss: the (CE, KL) pair the trainer takes and J_tot = CE + γ·τ·KL
    eager.py      cross_entropy, augmented_kl and their hand-written blocks (the reference path)
    linear.py     linear_cross_entropy: the decoder and the cross-entropy as one node (no AL)
    compiled.py   the same (tokens × |V|) passes fused by torch.compile (train.compile)
    static.py     the target side over every token: static shapes for CUDA-graph capture

Imports run one way: compiled and static reuse eager's pieces, augmented picks among the three.
"""

from tiedlm.loss.augmented import AugmentedLoss
from tiedlm.loss.eager import DEFAULT_CHUNK_ELEMENTS, augmented_kl, cross_entropy
from tiedlm.loss.linear import linear_cross_entropy
from tiedlm.loss.static import STATIC_CHUNK_ELEMENTS, static_components

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "STATIC_CHUNK_ELEMENTS",
    "AugmentedLoss",
    "augmented_kl",
    "cross_entropy",
    "linear_cross_entropy",
    "static_components",
]
