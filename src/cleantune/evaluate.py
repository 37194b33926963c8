"""Metrics: clean accuracy (CACC), attack success rate (ASR), and detection scores for flagged samples."""

from __future__ import annotations

from functools import partial

from .data import TextDataset, bare_ids
from .errors import UserError
from .models import Classifier
from .training import in_shares


def label_mapping(data_names: list[str], model_names: list[str], data: str = "the data") -> list[int]:
    """For each class id of the data, the model's id of the same class, matched by name (ignoring case where
    the model's names stay distinct): the two number their classes independently, a model trained on a file
    of names alphabetically, a benchmark in its own order. Where either side's names are bare ids (0..C-1, or
    transformers' default LABEL_i), there is nothing to match but positions."""
    if bare_ids(data_names) or bare_ids(model_names):
        if len(data_names) != len(model_names):
            raise UserError(f"{data} has {len(data_names)} classes, the model {len(model_names)}")
        return list(range(len(data_names)))
    folded = {n.casefold() for n in model_names}
    fold = str.casefold if len(folded) == len(model_names) else (lambda s: s)
    ids = {fold(n): i for i, n in enumerate(model_names)}
    mapping = [ids.get(fold(n)) for n in data_names]
    if None in mapping or len(set(mapping)) != len(model_names):
        raise UserError(f"the labels of {data} ({', '.join(data_names)}) are not the model's "
                        f"({', '.join(model_names)}); classes are matched by name")
    return mapping


def align_labels(data: TextDataset, model_names: list[str], name: str = "the data") -> TextDataset:
    """`data` with its labels renumbered as the model numbers the same classes (see `label_mapping`)."""
    mapping = label_mapping(data.label_names, model_names, name)
    if mapping == list(range(len(mapping))) and data.label_names == list(model_names):
        return data
    return TextDataset(data.texts, [mapping[y] for y in data.labels], list(model_names), data.poisoned)


def _share_correct(preds: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(preds, labels)) / len(labels) if labels else float("nan")


def evaluate(model: Classifier, clean_test: TextDataset, triggered_test: TextDataset | None = None,
             progress: bool | str | None = None, shard: bool = False) -> dict:
    """CACC on the clean test split; ASR = share of triggered non-target samples predicted as the target
    (the triggered set's labels are the target). `asr_floor` is the share of clean non-target test samples
    predicted as the target with no trigger at all: the ASR a model that ignores the trigger still shows,
    the level a defense can at best bring ASR down to. `predicted_classes` counts the classes predicted on
    the clean test split: 1 marks a model that predicts one class whatever the input.
    Both sets are first renumbered to the model's label ids by class name (`align_labels`), so the target is
    the class the triggered set's labels name in the data's own numbering. `progress`: True for progress
    bars, or their description (none without; a bare predictor's `predict` need not take it then).
    `shard`: under `accelerate launch`, every process calls evaluate with the same sets and shard=True; each
    predicts its share of the texts and all return the metrics of the whole sets (`training.in_shares`; a
    process that calls it alone with shard=True waits for the others). Without a launch it changes nothing."""
    if not callable(getattr(model, "predict", None)):  # a folder's path, say: an AttributeError below
        raise UserError(f"evaluate: model must be a Classifier (or have a predict method), got {type(model).__name__}"
                        + (" (load a saved model with Classifier.from_pretrained)" if isinstance(model, str) else ""))
    for what, data in (("clean_test", clean_test), ("triggered_test", triggered_test)):
        if (data is not None or what == "clean_test") and not isinstance(data, TextDataset):  # a list, a Benchmark
            raise UserError(f"evaluate: {what} must be a TextDataset (texts with labels), got {type(data).__name__}"
                            + (" (pass one of its splits: .test, or .clean_test and .triggered_test)"
                               if hasattr(data, "test") or hasattr(data, "clean_test") else ""))
    empty = next((w for w, d in (("clean_test", clean_test), ("triggered_test", triggered_test))
                  if d is not None and not len(d)), None)
    if empty:  # its score was NaN, and an empty clean_test read ASR's floor as 1.0 beside it
        raise UserError(f"evaluate: {empty} holds no sample")
    if triggered_test is not None and len(set(triggered_test.labels)) > 1:  # the floor would be read for labels[0]
        raise UserError(f"evaluate: triggered_test holds {len(set(triggered_test.labels))} classes; its labels are "
                        "the attack's target, one class (pass the attack's .triggered_test)")
    names = getattr(model, "label_names", None)  # a bare predictor has none: ids as they are
    if names is not None:
        clean_test = align_labels(clean_test, names)
        if triggered_test is not None:
            triggered_test = align_labels(triggered_test, names)

    def predict(data: TextDataset, what: str) -> list[int]:
        bar = {"progress": what if progress is True else f"{progress} ({what})"} if progress else {}
        scores = partial(model.predict, **bar)
        return in_shares(scores, data.texts) if shard else scores(data.texts)

    preds = predict(clean_test, "clean test")  # once, for CACC and the floor
    # 1: a degenerate model (one class for every input), whose CACC, ASR and floor say nothing of a defense;
    # a filter's abstentions (-1, defenses.common.ABSTAIN) are no class
    out = {"cacc": _share_correct(preds, clean_test.labels), "predicted_classes": len({p for p in preds if p >= 0})}
    if triggered_test is not None:
        out["asr"] = _share_correct(predict(triggered_test, "triggered test"), triggered_test.labels)
        target = triggered_test.labels[0]
        others = [p for p, y in zip(preds, clean_test.labels) if y != target]
        out["asr_floor"] = _share_correct(others, [target] * len(others))  # NaN: no clean sample of another class
    return out


def one_class_note(what: str, metrics: dict) -> str | None:
    """The warning for a run whose model predicts one class on every clean test sample (`predicted_classes` 1),
    or None: `run` and the benchmark scripts print it, so a degenerate row is not read as a defense's result."""
    if metrics.get("predicted_classes") != 1:
        return None
    return (f"note: {what} predicts one class for every clean test sample, so its CACC, ASR and floor say nothing "
            "of the defense (too few samples or epochs, or too high an lr)")


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
