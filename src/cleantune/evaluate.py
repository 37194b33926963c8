"""Metrics: clean accuracy (CACC), attack success rate (ASR), and detection scores for flagged samples."""

from __future__ import annotations

from .data import TextDataset
from .models import Classifier


def _share_correct(preds: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(preds, labels)) / len(labels) if labels else float("nan")


def accuracy_on(model: Classifier, data: TextDataset) -> float:
    return _share_correct(model.predict(data.texts) if len(data) else [], data.labels)


def evaluate(model: Classifier, clean_test: TextDataset, triggered_test: TextDataset | None = None) -> dict:
    """CACC on the clean test split; ASR = share of triggered non-target samples predicted as the target
    (the triggered set's labels are the target). `asr_floor` is the share of clean non-target test samples
    predicted as the target with no trigger at all: the ASR a model that ignores the trigger still shows,
    the level a defense can at best bring ASR down to."""
    preds = model.predict(clean_test.texts) if len(clean_test) else []  # once, for CACC and the floor
    out = {"cacc": _share_correct(preds, clean_test.labels)}
    if triggered_test is not None:
        out["asr"] = accuracy_on(model, triggered_test)
        if len(triggered_test):
            target = triggered_test.labels[0]
            others = [p for p, y in zip(preds, clean_test.labels) if y != target]
            out["asr_floor"] = _share_correct(others, [target] * len(others))
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
