"""STRIP (Gao et al. 2021, "Design and evaluation of a multi-domain trojan detection method on deep
neural networks"), as OpenBackdoor's STRIPDefender: perturb each input `repeat` times by overwriting a
share `swap_ratio` of its word positions with the highest-TF-IDF words of a random clean dev sentence,
and flag inputs whose mean prediction entropy is low (a trigger keeps the prediction fixed whatever else
changes). The threshold is the `frr` quantile of the entropies of the clean dev set.

Fixed here (spec §13.11-13): OpenBackdoor stores the perturbations sample-major and then reshapes the
entropies as (repeat, -1), which averages entropies of different samples; here each sample's entropy is
the mean over its own perturbations. Detection is not limited to binary tasks (see FlaggingClassifier
for the flagged-input convention), and every perturbation is seeded by (seed, text), so a sample's flag
does not depend on its batch or its position in the test set. The overwritten positions are distinct
(at least one), as in the RAP authors' STRIP-ViTA code: OpenBackdoor draws them with replacement, so
fewer than `swap_ratio` of the words change, and none in inputs of fewer than 1 / swap_ratio words.

With `strip_target` (the defender knows the target class, as RAP assumes) STRIP runs as the RAP
paper's STRIP-ViTA baseline (OpenBackdoor's use_oppsite_set): the replacement words come from the
clean dev samples not labelled as the target, the threshold is calibrated on the clean dev samples
predicted as the target, and only inputs predicted as the target are flagged.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..data import TextDataset
from ..errors import UserError
from ..models import Classifier
from .base import Defense
from .common import (FlaggingClassifier, check_on_flag, check_flag_task, frr_threshold, softmax_probs,
                     victim_model)

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn TfidfVectorizer's default, as OpenBackdoor uses it


def tfidf_ranked_words(texts: list[str]) -> list[list[str]]:
    """Per text, its words by decreasing TF-IDF (scikit-learn's defaults: lowercase, raw counts, smoothed
    idf = ln((1+n)/(1+df)) + 1); ties broken alphabetically as in the vectorizer's sorted vocabulary."""
    docs = [Counter(_TOKEN.findall(t.lower())) for t in texts]
    df = Counter(w for d in docs for w in d)
    n = len(docs)
    idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}
    return [sorted(d, key=lambda w: (-d[w] * idf[w], w)) for d in docs]


class StripClassifier(FlaggingClassifier):
    """With `target` set, only inputs predicted as the target are scored and flagged."""

    def __init__(self, base: Classifier, pieces: list[list[str]], repeat: int, swap_ratio: float, seed: int,
                 on_flag: str, threshold: float = float("-inf"), target: int | None = None):
        super().__init__(base, on_flag)
        self.pieces = [p for p in pieces if p]
        if not self.pieces:
            raise UserError("STRIP: the clean dev set has no word to perturb with")
        self.repeat, self.swap_ratio, self.seed, self.threshold = repeat, swap_ratio, seed, threshold
        self.target = target

    def perturb(self, text: str, rng: random.Random) -> str:
        tokens = text.split()
        if not tokens:
            return text
        positions = rng.sample(range(len(tokens)), max(1, int(len(tokens) * self.swap_ratio)))
        piece = self.pieces[rng.randrange(len(self.pieces))]
        for i, j in enumerate(positions):
            # OpenBackdoor runs past a short piece into zero-TF-IDF vocabulary words; we cycle the piece
            tokens[j] = piece[i % len(piece)]
        return " ".join(tokens)

    def entropies(self, texts: list[str]) -> np.ndarray:
        """Mean prediction entropy (bits) over each text's own `repeat` perturbations."""
        perturbed = []
        for t in texts:
            rng = random.Random(f"strip-{self.seed}-{t}")
            perturbed += [self.perturb(t, rng) for _ in range(self.repeat)]
        p = np.clip(softmax_probs(self, perturbed).numpy(), 1e-10, 1 - 1e-10)
        h = -(p * np.log2(p)).sum(-1)
        return h.reshape(len(texts), self.repeat).mean(1)  # sample-major, as built above

    def scored(self, texts: list[str]) -> np.ndarray:
        """Which texts STRIP scores: all, or with `target` those predicted as the target."""
        if self.target is None:
            return np.ones(len(texts), dtype=bool)
        return np.array(Classifier.predict(self, texts), dtype=int) == self.target

    def detect(self, texts):
        scored = self.scored(texts)
        flags = np.zeros(len(texts), dtype=bool)
        if scored.any():
            flags[scored] = self.entropies([t for t, s in zip(texts, scored) if s]) < self.threshold
        return flags.tolist()


@dataclass
class STRIP(Defense):
    repeat: int = 5
    swap_ratio: float = 0.25
    frr: float = 0.01
    on_flag: str = "auto"
    strip_target: int | None = None  # the RAP paper's STRIP-ViTA variant (module docstring); not the attack's `target`

    victim: str | None = None  # a trained classifier directory to wrap instead of training one

    name = "strip"
    bounds = {"repeat": "(0, inf)", "swap_ratio": "(0, 1]", "frr": "[0, 1)"}
    at_inference = True
    step_hooks = False
    clean_data = "clean dev: model selection, replacement words (TF-IDF) and the entropy threshold"

    def __post_init__(self):
        self._check_types()  # before this class's own checks compare the values
        check_on_flag(self.on_flag)
        super().__post_init__()

    def check_task(self, num_labels: int) -> None:
        check_flag_task(self.on_flag, num_labels)
        if self.strip_target is not None and not 0 <= self.strip_target < num_labels:
            raise UserError(f"STRIP: option strip_target={self.strip_target} is not a class (0..{num_labels - 1})")

    def fit(self, train_data: TextDataset, clean_dev: TextDataset | None = None, *, out_dir=None, resume=False,
            progress=True) -> Classifier:
        if clean_dev is None or len(clean_dev) == 0:
            raise UserError("STRIP needs a clean dev set (--dev) to calibrate its threshold")
        self.check_task(train_data.num_labels)
        victim = victim_model(self, train_data, clean_dev, out_dir, resume, progress)
        donors = [t for t, y in zip(clean_dev.texts, clean_dev.labels) if y != self.strip_target]
        clf = StripClassifier(victim, tfidf_ranked_words(donors), self.repeat, self.swap_ratio, self.seed,
                              self.on_flag, target=self.strip_target)
        scored = clf.scored(clean_dev.texts)
        if not scored.any():
            raise UserError(f"STRIP: no clean dev sample is predicted as the target {self.strip_target}; "
                            "cannot calibrate")
        self.clean_entropies_ = clf.entropies([t for t, s in zip(clean_dev.texts, scored) if s])
        clf.threshold = frr_threshold(self.clean_entropies_, self.frr)
        self.extra_metrics_ = {"strip_threshold": clf.threshold}
        return clf
