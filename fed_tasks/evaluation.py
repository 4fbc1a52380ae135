"""Detection metrics; anomalies are the positive class (label 1)."""

from __future__ import annotations

from typing import Any

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


def noise_check(per_site: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A DP model against the same model untrained, on the sites' held-out rows.

    Each site of a DP job reports both ROC-AUCs (metrics only, as approved); the means are
    weighted by test rows. ``worse_than_untrained``: the noise left a model that ranks
    anomalies worse than no training at all, which the report and the CLI must say rather
    than hand over as a detector. None when no site could rank (one-class test splits)."""
    known = [r for r in per_site if r.get("roc_auc") is not None
             and (r.get("untrained") or {}).get("roc_auc") is not None]
    total = sum(int(r["n_test"]) for r in known)
    if not total:
        return None
    trained = sum(r["roc_auc"] * int(r["n_test"]) for r in known) / total
    untrained = sum(r["untrained"]["roc_auc"] * int(r["n_test"]) for r in known) / total
    return {"roc_auc": trained, "untrained_roc_auc": untrained,
            "worse_than_untrained": trained < untrained,
            "sites_below": [r.get("site") for r in known
                            if r["roc_auc"] < r["untrained"]["roc_auc"]]}


def noise_warning(check: dict[str, Any] | None) -> str | None:
    """The line a user must see when a DP model is worse than an untrained one."""
    if not check or not check["worse_than_untrained"]:
        return None
    return (f"WARNING: the DP model ranks anomalies worse than the untrained model on the "
            f"sites' held-out rows (ROC-AUC {check['roc_auc']:.3f} < "
            f"{check['untrained_roc_auc']:.3f}; sites {', '.join(map(str, check['sites_below']))}"
            "): the noise swamped what it learned; do not deploy it. Use a larger epsilon, "
            "more sites, or --dp-unit row")
