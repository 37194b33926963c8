"""Pieces the baseline defenses share: training a side model, first-token representations, per-sample
losses, FRR-calibrated thresholds, and the Classifier that applies an inference-time detector.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..data import TextDataset
from ..errors import UserError
from ..models import Classifier, as_texts, check_max_length, load_model, load_tokenizer
from ..training import StepHook, TrainReport, encode, make_batch, seed_everything, train

ABSTAIN = -1  # the prediction for a flagged input under on_flag="abstain": never equals a class id


def train_side_model(defense, data: TextDataset, epochs: int, dev: TextDataset | None, out_dir, resume: bool,
                     progress: bool, desc: str, hooks: tuple[StepHook, ...] = (), lr: float | None = None,
                     model=None, tokenizer=None) -> tuple[object, object, TrainReport]:
    """Train a model with the defense's settings (other epochs/lr) through the one training loop.
    Without `model`, a fresh copy of the backbone is built; `dev=None` keeps the last epoch."""
    seed_everything(defense.seed)
    tokenizer = tokenizer or load_tokenizer(defense.model)
    model = model if model is not None else load_model(defense.model, data.label_names, tokenizer=tokenizer)
    settings = replace(defense.train_settings(), epochs=epochs, **({"lr": lr} if lr is not None else {}))
    check_max_length(model, tokenizer, settings.max_length, f"--model {defense.model}")
    report = train(model, tokenizer, data, dev, settings, hooks, out_dir, resume, progress, desc=desc,
                   identity=defense.identity())
    return model, tokenizer, report


def with_stages(report: TrainReport, *stages: TrainReport | None) -> TrainReport:
    """`report`, the defended model's training (its history, selection and throughput), with the training time
    of the defense's other trained stages added, and their earlier sessions' share of it: a resumed run's
    wall time adds every stage's earlier training, not the last stage's alone (runner._run)."""
    stages = [s for s in stages if s is not None]
    return replace(report, train_seconds=report.train_seconds + sum(s.train_seconds for s in stages),
                   resumed_train_seconds=report.resumed_train_seconds + sum(s.resumed_train_seconds for s in stages))


def side_dir(out_dir, name: str) -> Path | None:
    return Path(out_dir) / name if out_dir is not None else None


def sentence_state(model, batch: dict) -> torch.Tensor:
    """The final-layer hidden state that stands for each sentence of a (right-padded) batch: the first
    token's in an encoder ([CLS], as OpenBackdoor's get_repr_embeddings); in a causal LM, whose first token
    sees only itself, the last real token's, the one its classification head reads."""
    from ..adapters.mslr import backbone_family

    h = model(**batch, output_hidden_states=True).hidden_states[-1]
    if backbone_family(model) == "causal":
        return h[torch.arange(h.shape[0], device=h.device), batch["attention_mask"].sum(1) - 1]
    return h[:, 0]


@torch.no_grad()
def sentence_states(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 128) -> torch.Tensor:
    """sentence_state of every text."""
    was_training = model.training
    model.eval()
    ids = encode(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = None
    device = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = make_batch([ids[i] for i in idx], tokenizer.pad_token_id)
        h = sentence_state(model, {k: v.to(device) for k, v in batch.items()})
        if out is None:
            out = torch.empty(len(ids), h.shape[-1])
        out[idx] = h.float().cpu()
    model.train(was_training)
    return out


@torch.no_grad()
def per_sample_losses(model, tokenizer, data: TextDataset, max_length: int, batch_size: int = 128) -> np.ndarray:
    """Cross-entropy of every sample under the model in eval mode (no dropout)."""
    logits = Classifier(model, tokenizer, data.label_names, max_length).predict_logits(data.texts, batch_size)
    return torch.nn.functional.cross_entropy(logits, torch.tensor(data.labels), reduction="none").numpy()


def frr_threshold(clean_scores, frr: float) -> float:
    """The threshold below which a score is flagged, set so that a share `frr` of the clean scores falls
    below it: the score at sorted index floor(n * frr), as OpenBackdoor's STRIP (its RAP takes
    np.nanpercentile, which interpolates: at most one clean score more or fewer falls below). Flag with `< t`.
    NaN scores are left out (n counts the others), as nanpercentile leaves them out."""
    s = np.asarray(clean_scores, dtype=float)
    if len(s) == 0:
        raise UserError("the clean dev set gives no sample to calibrate the detection threshold on")
    # counted in n, NaNs (sorted last) push the index up the other scores (a higher FRR) or onto a NaN, and a
    # NaN threshold flags nothing
    s = np.sort(s[~np.isnan(s)])
    if len(s) == 0:
        raise UserError("every clean dev sample's detection score is NaN (the model's outputs are not finite); "
                        "cannot calibrate the detection threshold")
    return float(s[min(int(len(s) * frr), len(s) - 1)])


def check_flag_task(on_flag: str, num_labels: int) -> None:
    if on_flag == "flip" and num_labels != 2:
        raise UserError("option on_flag=flip needs a binary task; use on_flag=abstain")


def check_on_flag(on_flag: str) -> None:
    """STRIP's and RAP's, at construction: before any data loads."""
    if on_flag not in ("auto", "flip", "abstain"):
        raise UserError(f"option on_flag must be auto, flip or abstain, got '{on_flag}'")


class FlaggingClassifier(Classifier):
    """A trained classifier behind an inference-time detector.

    `flag(texts)` says which inputs the detector rejects. `predict` applies the convention `on_flag`:
    'flip' (binary tasks only) predicts the other class for a flagged input, which is exactly OpenBackdoor's
    flip of the ground-truth label before scoring (spec §10); 'abstain' predicts ABSTAIN (-1), which matches
    no class, so a flagged poisoned input counts as a failed attack and a flagged clean input as an error,
    for any number of classes. `predict_logits` is the victim's, untouched. Flags are cached per text.
    """

    def __init__(self, base: Classifier, on_flag: str):
        super().__init__(base.model, base.tokenizer, base.label_names, base.max_length)
        if on_flag == "auto":
            on_flag = "flip" if len(base.label_names) == 2 else "abstain"
        if on_flag not in ("flip", "abstain"):
            raise UserError(f"option on_flag must be auto, flip or abstain, got '{on_flag}'")
        check_flag_task(on_flag, len(base.label_names))
        self.on_flag = on_flag
        self._flags: dict[str, bool] = {}

    def detect(self, texts: list[str]) -> list[bool]:
        raise NotImplementedError

    def flag(self, texts: list[str] | str) -> list[bool]:
        texts = as_texts(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in self._flags))
        if todo:
            self._flags.update(zip(todo, self.detect(todo)))
        return [self._flags[t] for t in texts]

    def predict(self, texts: list[str] | str, batch_size: int = 128, progress: bool | str | None = None) -> list[int]:
        texts = as_texts(texts)
        preds = super().predict(texts, batch_size, progress)
        flags = self.flag(texts)
        if self.on_flag == "flip":
            return [1 - p if f else p for p, f in zip(preds, flags)]
        return [ABSTAIN if f else p for p, f in zip(preds, flags)]


def softmax_probs(clf: Classifier, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    return torch.softmax(clf.predict_logits(texts, batch_size), -1) if texts else torch.empty(0, len(clf.label_names))



def load_victim(path: str) -> Classifier:
    try:
        return Classifier.from_pretrained(path)
    except UserError as e:  # its message names the folder; this names the option that gave it
        raise UserError(f"option victim: {e}") from None


def victim_model(defense, train_data: TextDataset, clean_dev: TextDataset | None, out_dir, resume: bool,
                 progress: bool) -> Classifier:
    """The model an inference-time defense wraps: trained as plain fine-tuning, or, with the defense's
    `victim` option, an already trained classifier directory (no training; an empty report)."""
    from .base import Defense

    if defense.victim is None:
        return Defense.fit(defense, train_data, clean_dev, out_dir=out_dir, resume=resume, progress=progress)
    from ..evaluate import label_mapping

    clf = load_victim(defense.victim)
    # the defense reads targets and dev labels in the data's numbering: the victim must number classes alike
    mapping = label_mapping(train_data.label_names, clf.label_names, f"option victim={defense.victim}: the data")
    if mapping != list(range(len(mapping))):
        raise UserError(f"option victim={defense.victim}: the model numbers its classes "
                        f"({', '.join(clf.label_names)}) otherwise than the data ({', '.join(train_data.label_names)})")
    defense.report_ = TrainReport([], None, 0.0, 0.0, 0.0)
    return clf
