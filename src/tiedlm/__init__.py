"""tiedlm: word-level language models with tied word vectors and classifiers.

Implements Inan, Khosravi & Socher, "Tying Word Vectors and Word Classifiers:
A Loss Framework for Language Modeling" (ICLR 2017): reused embeddings (RE)
and the augmented loss (AL) on a variational-dropout LSTM (VD-LSTM).
"""

__version__ = "0.1.0"

from tiedlm import models  # noqa: E402, F401  (registers every architecture's settings with tiedlm.config)
from tiedlm.api import LanguageModel, Scores  # noqa: E402
from tiedlm.loss import AugmentedLoss, augmented_kl  # noqa: E402

__all__ = ["AugmentedLoss", "LanguageModel", "Scores", "augmented_kl", "__version__"]
