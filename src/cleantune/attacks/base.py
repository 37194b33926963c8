from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import Benchmark, TextDataset
from ..errors import UserError

MODES = ("dirty", "clean", "mix")


def check_target(target: int, n_classes: int, data: str) -> None:
    if not 0 <= target < n_classes:
        raise UserError(f"--target {target} is not a class of {data} (0..{n_classes - 1})")


@dataclass
class PoisonedBenchmark:
    dataset: str
    train: TextDataset           # poisoned train split; `poisoned` holds the ground truth
    dev: TextDataset             # clean dev: the only data a defense may select on
    clean_test: TextDataset
    triggered_test: TextDataset  # non-target test samples with the trigger, label = target
    triggered_dev: TextDataset   # the same for dev; for analysis plots only, never for selection
    trigger_words: list[str]     # the inserted words, for token-level audits; empty for syntax/style


@dataclass
class Attack:
    """Poisoning settings shared by every attack.

    mode: 'dirty' relabels non-target samples to the target, 'clean' poisons target-class samples only
    (labels unchanged), 'mix' draws from every class and relabels to the target.
    """

    rate: float = 0.1
    mode: str = "dirty"
    target: int = 1
    seed: int = 0

    name = "attack"

    def __post_init__(self):
        if not 0 < self.rate <= 1:
            raise UserError(f"--rate must be in (0, 1], got {self.rate}")
        if self.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")

    # Subclasses implement: the triggered version of one text, or None when this text cannot carry it.
    def trigger(self, text: str, rng: random.Random, split: str) -> str | None:
        raise NotImplementedError

    def trigger_words(self) -> list[str]:
        return []

    def prepare(self, bench: Benchmark) -> None:
        """Load whatever the trigger needs from the benchmark (paraphrase tables)."""

    def apply(self, bench: Benchmark) -> PoisonedBenchmark:
        check_target(self.target, bench.train.num_labels, bench.name)
        self.prepare(bench)
        rng = random.Random(f"{self.name}-{self.seed}")
        train = bench.train
        if self.mode == "clean":
            pool = [i for i, y in enumerate(train.labels) if y == self.target]
        elif self.mode == "dirty":
            pool = [i for i, y in enumerate(train.labels) if y != self.target]
        else:
            pool = list(range(len(train)))
        n = int(self.rate * len(train))
        if n == 0:
            raise UserError(f"--rate {self.rate} poisons no sample of a {len(train)}-sample train split")
        triggered = {}
        for i in pool:  # the trigger is computed for the whole pool so the draw does not depend on n
            t = self.trigger(train.texts[i], rng, "train")
            if t is not None:
                triggered[i] = t
        if n > len(triggered):
            raise UserError(f"--rate {self.rate} asks for {n} poisoned samples but the {self.mode}-mode pool of "
                            f"{bench.name} holds {len(triggered)} that can carry the {self.name} trigger")
        chosen = set(rng.sample(sorted(triggered), n))
        texts, labels = list(train.texts), list(train.labels)
        for i in chosen:
            texts[i], labels[i] = triggered[i], self.target
        poisoned_train = TextDataset(texts, labels, train.label_names, [i in chosen for i in range(len(train))])
        return PoisonedBenchmark(
            bench.name, poisoned_train, bench.dev, bench.test,
            self._triggered(bench.test, rng, "test"), self._triggered(bench.dev, rng, "dev"),
            self.trigger_words(),
        )

    def _triggered(self, ds: TextDataset, rng: random.Random, split: str) -> TextDataset:
        texts = []
        for t, y in zip(ds.texts, ds.labels):
            if y != self.target:
                tt = self.trigger(t, rng, split)
                if tt is not None:
                    texts.append(tt)
        if not texts:
            raise UserError(f"the {self.name} attack yields no triggered {split} sample for target {self.target}")
        return TextDataset(texts, [self.target] * len(texts), ds.label_names, [True] * len(texts))
