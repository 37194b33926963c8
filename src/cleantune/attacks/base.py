from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, fields

from ..data import Benchmark, TextDataset
from ..errors import UserError
from ..options import check_values

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


MIN_TRIGGERED_SHARE = 0.9  # of the non-target test and dev samples an attack must be able to trigger


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
        # the one conversion the CLI and config files get too (get_attack only constructs), so that
        # `rate="0.1"` works and `num_triggers=2.5` fails here rather than deep inside apply()
        values = check_values(type(self), {f.name: getattr(self, f.name) for f in fields(self)},
                              f"attack '{self.name}'")
        for k, v in values.items():
            setattr(self, k, v)
        if not 0 < self.rate <= 1:
            raise UserError(f"--rate must be in (0, 1], got {self.rate}")
        if self.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")

    # Subclasses implement: the triggered version of one text that `carries` the trigger.
    def trigger(self, text: str, rng: random.Random, split: str) -> str:
        raise NotImplementedError

    def carries(self, text: str, split: str) -> bool:
        """Whether this text can carry the trigger (a paraphrase attack needs a stored, changed paraphrase)."""
        return True

    def trigger_words(self) -> list[str]:
        return []

    def prepare(self, bench: Benchmark) -> None:
        """Load whatever the trigger needs from the benchmark (paraphrase tables)."""

    def poison_count(self, n_train: int) -> int:
        """How many of `n_train` samples `rate` poisons: rate x n rounded down, where a product within float
        error (a few units in the last place) of an integer is that integer (0.29 x 100 computes as
        28.999999999999996 and gives 29). A tolerance of 1e-9 took 0.9999999999 x 6920 for 6920."""
        x = self.rate * n_train
        return round(x) if math.isclose(x, round(x), rel_tol=8 * sys.float_info.epsilon) else math.floor(x)

    def _pool(self, train: TextDataset) -> list[int]:
        if self.mode == "clean":
            return [i for i, y in enumerate(train.labels) if y == self.target]
        if self.mode == "dirty":
            return [i for i, y in enumerate(train.labels) if y != self.target]
        return list(range(len(train)))

    def _plan(self, bench: Benchmark) -> tuple[list[int], int]:
        """The train samples that can carry the trigger and how many to poison, or the UserError that makes
        these settings impossible on `bench`. apply() and check() share it, so a check never disagrees
        with a run."""
        if not isinstance(bench, Benchmark):  # a poisoned one (applied twice), a split: an AttributeError below
            raise UserError(f"attack '{self.name}': apply takes a Benchmark (train, dev and test splits), got "
                            f"{type(bench).__name__}" + (" (already poisoned: apply the attack to the clean "
                                                        "benchmark)" if isinstance(bench, PoisonedBenchmark) else ""))
        for split in ("train", "dev", "test"):  # a dev split is needed too: its triggered copy, for analysis
            if not isinstance(getattr(bench, split), TextDataset):
                raise UserError(f"attack '{self.name}': the benchmark's {split} split must be a TextDataset, got "
                                f"{type(getattr(bench, split)).__name__}")
        check_target(self.target, bench.train.num_labels, bench.name)
        self.prepare(bench)
        train = bench.train
        n = self.poison_count(len(train))
        if n == 0:
            raise UserError(f"--rate {self.rate} poisons no sample of a {len(train)}-sample train split")
        carriers = [i for i in self._pool(train) if self.carries(train.texts[i], "train")]
        if n > len(carriers):
            raise UserError(f"--rate {self.rate} asks for {n} poisoned samples but the {self.mode}-mode pool of "
                            f"{bench.name} holds {len(carriers)} that can carry the {self.name} trigger")
        for split, ds in (("test", bench.test), ("dev", bench.dev)):
            others = [t for t, y in zip(ds.texts, ds.labels) if y != self.target]
            carry = sum(self.carries(t, split) for t in others)
            if not carry:
                raise self._none_triggered(split, ds.label_names)
            # an ASR over the few samples a paraphrase table happens to cover would be a number, not a measure
            # (hsol with --target 0: 1 of 1,243); the shipped tables can trigger 97-100 % of the samples they are for
            if carry < MIN_TRIGGERED_SHARE * len(others):
                raise UserError(f"the {self.name} attack can trigger only {carry} of the {len(others)} non-target "
                                f"{split} samples of {bench.name} for target {self._target_name(ds.label_names)} "
                                "(its stored paraphrases "
                                "cover other classes): choose another target")
        return carriers, n

    def check(self, bench: Benchmark) -> None:
        """Raise the UserError apply() would raise on `bench`, without drawing or inserting any trigger."""
        self._plan(bench)

    def apply(self, bench: Benchmark) -> PoisonedBenchmark:
        carriers, n = self._plan(bench)
        rng = random.Random(f"{self.name}-{self.seed}")
        train = bench.train
        # the trigger is computed for every carrier so the draw does not depend on n
        triggered = {i: self.trigger(train.texts[i], rng, "train") for i in carriers}
        chosen = set(rng.sample(sorted(triggered), n))
        texts, labels = list(train.texts), list(train.labels)
        for i in chosen:
            texts[i], labels[i] = triggered[i], self.target
        poisoned_train = TextDataset(texts, labels, train.label_names, [i in chosen for i in range(len(train))])
        return PoisonedBenchmark(
            bench.name, poisoned_train, bench.dev, bench.test,
            self.triggered_set(bench.test, rng, "test"), self.triggered_set(bench.dev, rng, "dev"),
            self.trigger_words(),
        )

    def triggered_set(self, ds: TextDataset, rng: random.Random, split: str) -> TextDataset:
        """The samples of `ds` not labelled `target` that can carry the trigger, triggered and labelled `target`:
        the set an ASR is measured on."""
        texts = [self.trigger(t, rng, split) for t, y in zip(ds.texts, ds.labels)
                 if y != self.target and self.carries(t, split)]
        if not texts:  # reached by `cleantune eval --attack` on a user's file, which no _plan() checked
            raise self._none_triggered(split, ds.label_names)
        return TextDataset(texts, [self.target] * len(texts), ds.label_names, [True] * len(texts))

    def _none_triggered(self, split: str, label_names: list[str] | None = None) -> UserError:
        return UserError(f"the {self.name} attack yields no triggered {split} sample for target "
                         f"{self._target_name(label_names)}")

    def _target_name(self, label_names: list[str] | None) -> str:
        # by the name the user gave (`--target pos`) where the data's labels have names
        ok = label_names and 0 <= self.target < len(label_names)
        return str(label_names[self.target] if ok else self.target)
