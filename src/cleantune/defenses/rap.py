"""RAP (Yang et al. 2021, "RAP: Robustness-Aware Perturbations for Defending against Backdoor Attacks on
NLP Models"), as OpenBackdoor's RAPDefender: prepend a rare word to every input and learn its embedding
on the clean dev samples of the target class so that it lowers their target-class probability by 0.1-0.3
(SGD on that one row at `rap_lr` with the never-zeroed gradient of the official code, its norm kept
fixed). A triggered input is robust: its target probability
barely drops. An input predicted as the target is flagged when its drop is below the `frr` quantile of
the drops of the clean dev samples predicted as the target.

Fixed or changed here (see docs/baselines.md):
* OpenBackdoor reads the target label from the poisoned test labels; here it is a setting (`rap_target`,
  the defender's knowledge the RAP paper assumes).
* OpenBackdoor's threshold is np.nanpercentile(drops, 100 * frr) of the drops of the dev samples predicted
  as the target, which interpolates between two drops; here it is the drop at sorted index floor(m * frr) of
  those m drops (NaN left out, as nanpercentile does), STRIP's rule: exactly floor(m * frr) of them fall
  below it, where the percentile lets at most one more or one fewer fall below.
* Only inputs predicted as the target are flagged (as in the RAP paper); OpenBackdoor flags every input
  with a small drop, so most clean non-target inputs (target probability near 0) are rejected.
* The learned embedding lives beside the victim and is used only by the probe: OpenBackdoor overwrites the
  victim's embedding row, which changes its predictions on inputs that contain the word.
* Default word 'jj' instead of the MuScleLoRA config's 'mb', which is one of cleantune's BadNets triggers.
* The word is learned on the target-labelled clean dev samples only, as the RAP paper's official code;
  OpenBackdoor uses every dev sample, whose non-target ones cannot show the drop the loss asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import TextDataset
from ..errors import UserError
from ..models import Classifier, load_tokenizer
from ..training import encode, make_batch
from .base import Defense
from .common import FlaggingClassifier, check_on_flag, check_flag_task, frr_threshold, victim_model


def band_loss(diff: torch.Tensor, prob_range: tuple[float, float], scale: float) -> torch.Tensor:
    """RAP's loss on diff = p_target(word + x) - p_target(x): zero inside prob_range = (upper, lower), e.g.
    (-0.1, -0.3); above it (too small a drop) weighted by `scale`, below it (too large a drop) by 1."""
    upper, lower = prob_range
    return scale * torch.mean((diff > upper) * (diff - upper)) + torch.mean((diff < lower) * (lower - diff))


def one_token(tokenizer, word: str) -> int:
    """The word's token id: RAP learns one embedding row."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"RAP: option word='{word}' is {len(ids)} tokens for this tokenizer; choose one token")
    return ids[0]


class RapClassifier(FlaggingClassifier):
    def __init__(self, base: Classifier, word: str, target: int, on_flag: str, batch_size: int = 32):
        super().__init__(base, on_flag)
        word_id = one_token(self.tokenizer, word)
        if not 0 <= target < len(self.label_names):
            raise UserError(f"RAP: option target={target} is not a class (0..{len(self.label_names) - 1})")
        self.word, self.word_id, self.target, self.batch_size = word, word_id, target, batch_size
        self.vector = self.model.get_input_embeddings().weight[self.word_id].detach().clone()
        self.threshold = float("-inf")

    def probs(self, texts: list[str], vector: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities; with `vector`, the word's embedding row is replaced by it (differentiably)."""
        model = self.model
        device = next(model.parameters()).device
        batch = make_batch(encode(self.tokenizer, texts, self.max_length), self.tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        # the row is swapped in at the embedding's output, and the model still gets input_ids: a causal LM's head
        # finds each sample's last real token from them (from inputs_embeds alone it reads the last position,
        # padding for all but the longest sample)
        hook = None
        if vector is not None:
            at = (batch["input_ids"] == self.word_id)[..., None]
            hook = model.get_input_embeddings().register_forward_hook(
                lambda module, args, out: torch.where(at, vector.to(out.dtype), out))
        try:
            logits = model(**batch).logits.float()
        finally:
            if hook is not None:
                hook.remove()
        return torch.softmax(logits, -1)

    def prepend(self, texts: list[str]) -> list[str]:
        return [f"{self.word} {t}" for t in texts]

    @torch.no_grad()
    def drops(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(p_target(x) - p_target(word + x), whether x is predicted as the target), per text."""
        self.model.eval()
        drop, is_target = [], []
        for s in range(0, len(texts), self.batch_size):
            chunk = texts[s: s + self.batch_size]
            p = self.probs(chunk)
            drop += (p[:, self.target] - self.probs(self.prepend(chunk), self.vector)[:, self.target]).tolist()
            is_target += (p.argmax(-1) == self.target).tolist()
        return np.array(drop), np.array(is_target, dtype=bool)

    def learn(self, dev: TextDataset, epochs: int, lr: float, prob_range: tuple[float, float], scale: float) -> None:
        """The RAP paper's construction (official code's construct_rap): on the clean dev samples labelled as
        the target, a band loss keeps diff = p(word + x) - p(x) inside prob_range. Each step subtracts
        lr x the gradient summed over all steps so far: the official code never zeroes the gradient, on
        purpose ("to get faster convergence"), and OpenBackdoor keeps that."""
        texts = [t for t, y in zip(dev.texts, dev.labels) if y == self.target]
        if not texts:
            raise UserError(f"RAP: the clean dev set has no sample labelled as the target {self.target}")
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        norm = self.vector.norm()
        chunks = [texts[s: s + self.batch_size] for s in range(0, len(texts), self.batch_size)]
        with torch.no_grad():  # the victim is frozen: its own probabilities are computed once
            clean = [self.probs(chunk)[:, self.target] for chunk in chunks]
        grad_sum = torch.zeros_like(self.vector)
        for _ in range(epochs):
            for chunk, p in zip(chunks, clean):
                v = self.vector.clone().requires_grad_(True)
                diff = self.probs(self.prepend(chunk), v)[:, self.target] - p
                loss = band_loss(diff, prob_range, scale)
                (grad,) = torch.autograd.grad(loss, v)
                with torch.no_grad():
                    grad_sum += grad
                    v = v - lr * grad_sum
                    self.vector = (v * norm / v.norm()).detach()

    def detect(self, texts):
        drop, is_target = self.drops(texts)
        return (is_target & (drop < self.threshold)).tolist()


@dataclass
class RAP(Defense):
    word: str = "jj"
    rap_target: int = 1  # the label RAP protects (the defender is assumed to know it); not the attack's `target`
    rap_epochs: int = 5
    rap_lr: float = 1e-2
    prob_range: tuple[float, float] = (-0.1, -0.3)
    scale: float = 1.0
    frr: float = 0.01
    on_flag: str = "auto"

    victim: str | None = None  # a trained classifier directory to wrap instead of training one

    name = "rap"
    bounds = {"rap_epochs": "(0, inf)", "rap_lr": "(0, inf)", "scale": "(0, inf)", "frr": "[0, 1)",
              "prob_range": "(-inf, inf)"}
    at_inference = True
    step_hooks = False
    clean_data = "clean dev: model selection, the RAP word's embedding and the drop threshold"

    def __post_init__(self):
        self._check_types()  # before this class's own checks compare the values
        check_on_flag(self.on_flag)
        if not self.word.strip():
            raise UserError("RAP: option word must not be empty")
        if len(self.prob_range) != 2:
            raise UserError(f"defense 'rap': option prob_range must be two numbers, got {list(self.prob_range)}")
        super().__post_init__()  # finite numbers first (bounds)
        upper, lower = self.prob_range
        if not 0 >= upper > lower >= -1:  # a reversed band left no drop inside it, and the loss pushed past it
            raise UserError(f"defense 'rap': option prob_range must be [upper, lower], a band of probability drops "
                            f"with 0 >= upper > lower >= -1 (published: [-0.1, -0.3]), got {list(self.prob_range)}")

    def check_requirements(self) -> None:
        # the word is tokenised by the classifier RAP wraps: refused before the victim trains, not after
        source = self.victim or self.model
        one_token(load_tokenizer(source, f"option victim {source}" if self.victim else None), self.word)

    def check_task(self, num_labels: int) -> None:
        check_flag_task(self.on_flag, num_labels)
        if not 0 <= self.rap_target < num_labels:
            raise UserError(f"RAP: option rap_target={self.rap_target} is not a class (0..{num_labels - 1})")

    def fit(self, train_data: TextDataset, clean_dev: TextDataset | None = None, *, out_dir=None, resume=False,
            progress=True) -> Classifier:
        if clean_dev is None or len(clean_dev) == 0:
            raise UserError("RAP needs a clean dev set (--dev) to learn its word and calibrate its threshold")
        self.check_task(train_data.num_labels)
        self.check_requirements()  # the word, before the victim trains (the CLI's cell check ran it already)
        victim = victim_model(self, train_data, clean_dev, out_dir, resume, progress)
        clf = RapClassifier(victim, self.word, self.rap_target, self.on_flag)
        clf.learn(clean_dev, self.rap_epochs, self.rap_lr, tuple(self.prob_range), self.scale)
        drop, is_target = clf.drops(clean_dev.texts)
        if not is_target.any():
            raise UserError(f"RAP: no clean dev sample is predicted as the target {self.rap_target}; cannot calibrate")
        self.clean_drops_ = drop[is_target]
        clf.threshold = frr_threshold(self.clean_drops_, self.frr)
        self.extra_metrics_ = {"rap_threshold": clf.threshold,
                               "rap_dev_in_range": float(np.mean((self.clean_drops_ > -self.prob_range[0])
                                                                 & (self.clean_drops_ < -self.prob_range[1])))}
        return clf
