"""Defenses, all behind one interface (`Defense.fit(train, clean_dev) -> Classifier`)."""

from __future__ import annotations

from ..errors import UserError
from .abl import ABL
from .base import Defense, make_defense
from .bki import BKI
from .btu import BTU
from .cube import CUBE
from .finetune import FineTune
from .lora import LoRA
from .muscle import GA, GALoRA, LoRAMSLR, MuScleLoRA
from .onion import ONION
from .rap import RAP
from .strip import STRIP

DEFENSES: dict[str, type[Defense]] = {
    "finetune": FineTune, "lora": LoRA, "ga": GA, "ga-lora": GALoRA, "lora-mslr": LoRAMSLR, "muscle-lora": MuScleLoRA,
    "btu": BTU, "onion": ONION, "strip": STRIP, "rap": RAP, "bki": BKI, "cube": CUBE, "abl": ABL,
}


def get_defense(name: str, **options) -> Defense:
    if not isinstance(name, str) or name not in DEFENSES:  # a list is unhashable: a TypeError of the dict
        raise UserError(f"unknown defense '{name}' (choose from {', '.join(DEFENSES)})")
    return make_defense(DEFENSES[name], options)


__all__ = ["Defense", "FineTune", "LoRA", "GA", "GALoRA", "LoRAMSLR", "MuScleLoRA", "BTU", "ONION", "STRIP",
           "RAP", "BKI", "CUBE", "ABL", "DEFENSES", "get_defense", "make_defense"]
