"""Group fairness of a binary classifier, from its predictions, the labels and a
protected attribute (two groups, or the `privileged` value against all others)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _groups(predictions, labels, attribute, privileged) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    predictions, labels, attribute = (np.asarray(x) for x in (predictions, labels, attribute))
    if not (len(predictions) == len(labels) == len(attribute)):
        raise ValueError(f"predictions, labels and the attribute have {len(predictions)}, {len(labels)} and "
                         f"{len(attribute)} rows; they must be equal")
    is_privileged = attribute == privileged
    if is_privileged.all() or not is_privileged.any():
        raise ValueError(f"the attribute must hold both the privileged value {privileged!r} and others")
    return predictions.astype(bool), labels.astype(bool), is_privileged


def demographic_parity_difference(predictions: Sequence, attribute: Sequence, privileged: Any) -> float:
    """P(ŷ=1 | unprivileged) - P(ŷ=1 | privileged); 0 is parity."""
    predictions, _, is_privileged = _groups(predictions, predictions, attribute, privileged)
    return float(predictions[~is_privileged].mean() - predictions[is_privileged].mean())


def equal_opportunity_difference(predictions: Sequence, labels: Sequence, attribute: Sequence,
                                 privileged: Any) -> float:
    """True-positive rate of the unprivileged group minus the privileged group's; 0 is equal."""
    predictions, labels, is_privileged = _groups(predictions, labels, attribute, privileged)
    tpr = lambda group: predictions[group & labels].mean()
    if not (labels & is_privileged).any() or not (labels & ~is_privileged).any():
        raise ValueError("each group needs at least one positive label for a true-positive rate")
    return float(tpr(~is_privileged) - tpr(is_privileged))


def disparate_impact_ratio(predictions: Sequence, attribute: Sequence, privileged: Any) -> float:
    """P(ŷ=1 | unprivileged) / P(ŷ=1 | privileged); 1 is parity (the "80% rule" asks ≥ 0.8)."""
    predictions, _, is_privileged = _groups(predictions, predictions, attribute, privileged)
    privileged_rate = predictions[is_privileged].mean()
    return float(predictions[~is_privileged].mean() / privileged_rate) if privileged_rate else float("inf")
