"""Defenses, all behind one interface (`Defense.fit(train, clean_dev) -> Classifier`)."""

from __future__ import annotations

from ..errors import UserError
from .base import Defense, make_defense
from .btu import BTU
from .finetune import FineTune
from .lora import LoRA

DEFENSES: dict[str, type[Defense]] = {"finetune": FineTune, "lora": LoRA, "btu": BTU}


def get_defense(name: str, **options) -> Defense:
    if name not in DEFENSES:
        raise UserError(f"unknown defense '{name}' (choose from {', '.join(DEFENSES)})")
    return make_defense(DEFENSES[name], options)


__all__ = ["Defense", "BTU", "FineTune", "LoRA", "DEFENSES", "get_defense", "make_defense"]
