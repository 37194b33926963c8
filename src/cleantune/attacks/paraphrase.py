"""Paraphrase triggers looked up in the benchmark's tables: the syntactic template of HiddenKiller
(Qi et al. 2021) and the Bible style of StyleBkd (Qi et al. 2021). The paraphrasers are too large to
run here, so a sentence without a stored paraphrase cannot carry the trigger and leaves the pool.
A few stored "paraphrases" equal their original sentence (the paraphraser failed; e.g. 14 of sst2's
syntactic train rows, 71 of hsol's style train rows): they carry no trigger and leave the pool too."""

from __future__ import annotations

from dataclasses import dataclass

from ..data import load_paraphrases
from .base import Attack


@dataclass
class _Paraphrase(Attack):
    def prepare(self, bench):
        self._table = load_paraphrases(bench, self.name)

    def carries(self, text, split):
        return self._table[split].get(text, text) != text

    def trigger(self, text, rng, split):
        return self._table[split][text]


@dataclass
class Syntactic(_Paraphrase):
    name = "syntactic"


@dataclass
class Style(_Paraphrase):
    name = "style"
