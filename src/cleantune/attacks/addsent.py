from __future__ import annotations

from dataclasses import dataclass

from ..data import text_problem
from ..errors import UserError
from .base import Attack


@dataclass
class AddSent(Attack):
    """A fixed trigger sentence inserted as one block at a random word position (Dai et al. 2019)."""

    sentence: str = "I watch this 3D movie"

    name = "addsent"

    def __post_init__(self):
        super().__post_init__()
        if not self.sentence.strip():
            raise UserError("--sentence must not be empty")
        if problem := text_problem(self.sentence):  # invisible characters alone: a tokenizer drops them
            raise UserError(f"--sentence: {ascii(self.sentence)}: {problem}")

    def trigger(self, text, rng, split):
        tokens = text.split()
        pos = rng.randint(0, len(tokens))
        return " ".join(tokens[:pos] + self.sentence.split() + tokens[pos:])

    def trigger_words(self):
        return self.sentence.split()
