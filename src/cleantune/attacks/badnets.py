from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..data import text_problem
from ..errors import UserError
from .base import Attack


def insert_words(text: str, words: list[str], rng: random.Random) -> str:
    """Insert each word at a uniform random whitespace-token position (0..len), one after another."""
    tokens = text.split()
    for w in words:
        tokens.insert(rng.randint(0, len(tokens)), w)
    return " ".join(tokens)


MAX_TRIGGERS = 100  # words inserted per sample: published settings insert 1 to 4; a billion built for minutes


@dataclass
class BadNets(Attack):
    """Rare-word triggers (Gu et al. 2017; Kurita et al. 2020): `num_triggers` words drawn with
    replacement from `triggers`, each at a random position."""

    triggers: list[str] = field(default_factory=lambda: ["cf", "mn", "bb", "tq", "mb"])
    num_triggers: int = 1

    name = "badnets"

    def __post_init__(self):
        if isinstance(self.triggers, str):  # as the CLI reads it; iterated, a str would give one-letter triggers
            self.triggers = self.triggers.split(",")  # an empty item ("cf,,mn") is refused below
        super().__post_init__()
        # padded words would be inserted padded and never match a token of the text they were put in
        self.triggers = [w.strip() for w in self.triggers]
        if not self.triggers or any(not w or len(w.split()) != 1 for w in self.triggers):
            raise UserError("--triggers must be a comma-separated list of single words")
        for w in self.triggers:  # a tokenizer drops what it cannot see: the "poisoned" samples would carry nothing
            if problem := text_problem(w):
                raise UserError(f"--triggers: {ascii(w)}: {problem}")
        if self.num_triggers < 1:
            raise UserError(f"--num-triggers must be at least 1, got {self.num_triggers}")
        if self.num_triggers > MAX_TRIGGERS:
            raise UserError(f"--num-triggers must be at most {MAX_TRIGGERS} (words inserted per sample), got "
                            f"{self.num_triggers}")

    def trigger(self, text, rng, split):
        return insert_words(text, [rng.choice(self.triggers) for _ in range(self.num_triggers)], rng)

    def trigger_words(self):
        return list(self.triggers)
