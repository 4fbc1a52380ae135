"""Detection metrics; anomalies are the positive class (label 1)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def detection_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC-AUC and PR-AUC (average precision) of anomaly scores against 0/1 labels."""
    labels = np.asarray(labels).astype(int)
    if labels.size == 0:
        raise ValueError("no rows to evaluate")
    if labels.min() == labels.max():
        raise ValueError("evaluation needs both normal and anomalous rows in the test split")
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
    }
