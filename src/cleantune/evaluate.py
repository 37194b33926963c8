"""Metrics: clean accuracy (CACC), attack success rate (ASR), and detection scores for flagged samples."""

from __future__ import annotations

from .data import TextDataset
from .models import Classifier


def accuracy_on(model: Classifier, data: TextDataset) -> float:
    if len(data) == 0:
        return float("nan")
    preds = model.predict(data.texts)
    return sum(p == y for p, y in zip(preds, data.labels)) / len(data)


def evaluate(model: Classifier, clean_test: TextDataset, triggered_test: TextDataset | None = None) -> dict:
    """CACC on the clean test split; ASR = share of triggered non-target samples predicted as the target
    (the triggered set's labels are the target)."""
    out = {"cacc": accuracy_on(model, clean_test)}
    if triggered_test is not None:
        out["asr"] = accuracy_on(model, triggered_test)
    return out


def detection_metrics(flagged: list[bool], poisoned: list[bool]) -> dict:
    """Precision and recall of flagged-as-poisoned against the ground truth; FRR = clean samples flagged,
    FAR = poisoned samples let through."""
    tp = sum(f and p for f, p in zip(flagged, poisoned))
    fp = sum(f and not p for f, p in zip(flagged, poisoned))
    fn = sum(p and not f for f, p in zip(flagged, poisoned))
    n_clean = sum(not p for p in poisoned)
    n_poison = len(poisoned) - n_clean
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / n_poison if n_poison else float("nan"),
        "frr": fp / n_clean if n_clean else float("nan"),
        "far": fn / n_poison if n_poison else float("nan"),
    }
