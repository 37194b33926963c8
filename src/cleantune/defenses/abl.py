"""ABL, anti-backdoor learning (Li et al. 2021, "Anti-Backdoor Learning: Training Clean Models on
Poisoned Data", NeurIPS). Backdoored samples are learned faster than clean ones, so:

1. isolation: train for `isolation_epochs` with the local gradient ascent (LGA) loss
   sign(L - gamma) * L on each batch's mean loss: a batch whose loss fell below `gamma` is pushed back up,
   so clean samples cannot reach a low loss while the (stronger) backdoor samples still do; then take the
   `isolation_ratio` share of training samples with the lowest loss as the isolated set (at least one, and
   never all: at least one sample is left to train on);
2. training: continue training that model on the other samples with the ordinary loss for `epochs`
   (epoch chosen on clean dev);
3. unlearning: gradient ascent on the isolated samples (maximise their loss) for `unlearning_epochs` at
   `unlearning_lr`, which breaks the trigger-to-target mapping; the last epoch is kept, as in the paper.

The paper's image schedule (20 + 60 + 20 epochs from scratch) is shortened for pre-trained language
models, which fit a backdoor within one epoch. `flagged_` holds, after fit, the isolated samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..data import TextDataset
from ..errors import UserError
from ..models import Classifier
from ..training import StepHook
from .base import Defense
from .common import per_sample_losses, side_dir, train_side_model, with_stages


class LocalGradientAscent(StepHook):
    """sign(L - gamma) * L: the gradient is the plain one, negated while the batch loss is below gamma."""

    def __init__(self, gamma: float):
        self.gamma = gamma

    def after_backward(self, ctx):
        if float(ctx.loss) < self.gamma:
            for p in ctx.model.parameters():
                if p.grad is not None:
                    p.grad.neg_()


class GradientAscent(StepHook):
    """Maximise the loss: every step goes up the gradient."""

    def after_backward(self, ctx):
        for p in ctx.model.parameters():
            if p.grad is not None:
                p.grad.neg_()


def lowest_loss(losses: np.ndarray, ratio: float) -> list[bool]:
    """Flags for the max(1, round(ratio * n)) samples of lowest loss (ties: the earlier sample), at most n - 1."""
    # a ratio near 1 rounds up to every sample: at least one must stay for the training stage
    k = min(max(1, int(round(ratio * len(losses)))), len(losses) - 1)
    flags = np.zeros(len(losses), dtype=bool)
    flags[np.argsort(losses, kind="stable")[:k]] = True
    return flags.tolist()


@dataclass
class ABL(Defense):
    isolation_epochs: int = 1
    gamma: float = 0.5
    isolation_ratio: float = 0.01
    unlearning_epochs: int = 5
    unlearning_lr: float = 5e-5

    name = "abl"
    bounds = {"isolation_epochs": "(0, inf)", "gamma": "(0, inf)", "unlearning_lr": "(0, inf)",
              "isolation_ratio": "(0, 1)", "unlearning_epochs": "[0, inf)"}
    clean_data = "clean dev: model selection only"
    step_hooks = False

    def fit(self, train_data: TextDataset, clean_dev: TextDataset | None = None, *, out_dir=None, resume=False,
            progress=True) -> Classifier:
        if len(train_data) < 2:  # before the isolation stage trains: it would isolate the only sample
            raise UserError(f"ABL needs at least 2 training samples (one to isolate, one to train on), "
                            f"got {len(train_data)}")
        train_data = train_data.without_flags()
        model, tok, iso_report = train_side_model(self, train_data, self.isolation_epochs, None,
                                                  side_dir(out_dir, "abl-isolation"), resume, progress,
                                                  desc="abl isolation", hooks=(LocalGradientAscent(self.gamma),))
        self.losses_ = per_sample_losses(model, tok, train_data, self.max_length)
        self.flagged_ = lowest_loss(self.losses_, self.isolation_ratio)
        isolated = train_data.subset(i for i, f in enumerate(self.flagged_) if f)
        rest = train_data.subset(i for i, f in enumerate(self.flagged_) if not f)
        model, tok, self.report_ = train_side_model(self, rest, self.epochs, clean_dev, out_dir, resume, progress,
                                                    desc="abl", model=model, tokenizer=tok)
        history, unlearn = list(self.report_.history), None
        if self.unlearning_epochs:
            _, _, unlearn = train_side_model(self, isolated, self.unlearning_epochs, None,
                                             side_dir(out_dir, "abl-unlearning"), resume, progress,
                                             desc="abl unlearning", hooks=(GradientAscent(),),
                                             lr=self.unlearning_lr, model=model, tokenizer=tok)
            history += [{**r, "stage": "unlearning"} for r in unlearn.history]
        self.report_ = with_stages(replace(self.report_, history=history), iso_report, unlearn)
        self.extra_metrics_ = {"n_isolated": len(isolated), "isolation_history": iso_report.history}
        return Classifier(model, tok, train_data.label_names, self.max_length)

    def findings(self) -> str:
        return f"isolated {self.extra_metrics_['n_isolated']} sample(s) as suspected poison and unlearned them"
