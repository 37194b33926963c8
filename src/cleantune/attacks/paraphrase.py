"""Paraphrase triggers looked up in the benchmark's tables: the syntactic template of HiddenKiller
(Qi et al. 2021) and the Bible style of StyleBkd (Qi et al. 2021). The paraphrasers are too large to
run here, so a sentence without a stored paraphrase cannot carry the trigger and leaves the pool.
A few stored "paraphrases" equal their original sentence or are empty (the paraphraser failed; e.g. 14 of
sst2's syntactic train rows are unchanged and 1 is empty, 71 of hsol's style train rows are unchanged, 66 of
agnews's style train rows are empty): they carry no trigger and leave the pool too."""

from __future__ import annotations

from dataclasses import dataclass

from ..data import load_paraphrases
from .base import Attack


@dataclass
class _Paraphrase(Attack):
    def prepare(self, bench):
        self._table = load_paraphrases(bench, self.name)

    def carries(self, text, split):
        # an empty rewrite is a failed paraphrase, not a trigger: poisoned, it trained on "" labelled as the target
        paraphrase = self._table[split].get(text, "").strip()
        return bool(paraphrase) and paraphrase != text.strip()

    def trigger(self, text, rng, split):
        return self._table[split][text]


@dataclass
class Syntactic(_Paraphrase):
    name = "syntactic"


@dataclass
class Style(_Paraphrase):
    name = "style"
