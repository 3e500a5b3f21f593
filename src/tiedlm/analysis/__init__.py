"""The paper's analyses (docs/method.md §8): subspace distance, prediction study, embedding neighbours.

- :func:`subspace_distance` — how far the output matrix W lies from the column
  space of the embedding L: ‖(I − P_L) W‖_F / ‖W‖_F (0 = same space, 1 = orthogonal).
- :func:`run_subspace` — the experiment behind it: untied 2-layer LSTMs without
  dropout, embedding rows kept at unit norm, trained on a random 20,000-word slice
  of PTB with J = β·τ²|V|·J_aug + (1 − β)·J, swept over β and τ, several seeds.
- :func:`top_predictions`, :func:`prediction_study` — what two models predict,
  one context at a time and over a whole split (mass on ``<unk>`` and on the most
  frequent words, and how close the top predictions are to the target in
  embedding space).
- :func:`nearest_words` — cosine neighbours in a model's (tied) embedding.
"""

from tiedlm.analysis.neighbours import nearest_words
from tiedlm.analysis.predictions import (
    PredictionStats,
    compare_predictions,
    describe_checkpoint,
    prediction_claims,
    prediction_study,
    predictions_markdown,
    top_predictions,
)
from tiedlm.analysis.subspace import (
    PAPER_SUBSPACE,
    SubspaceSettings,
    plot_subspace,
    run_subspace,
    subspace_distance,
    subspace_markdown,
    subspace_study,
    summarize_subspace,
    train_subspace,
    unit_rows_,
    write_subspace_results,
)

__all__ = [
    "PAPER_SUBSPACE",
    "PredictionStats",
    "SubspaceSettings",
    "compare_predictions",
    "describe_checkpoint",
    "nearest_words",
    "plot_subspace",
    "prediction_claims",
    "prediction_study",
    "predictions_markdown",
    "run_subspace",
    "subspace_distance",
    "subspace_markdown",
    "subspace_study",
    "summarize_subspace",
    "top_predictions",
    "train_subspace",
    "unit_rows_",
    "write_subspace_results",
]
