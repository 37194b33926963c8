"""Defenses, all behind one interface (`Defense.fit(train, clean_dev) -> Classifier`)."""

from __future__ import annotations

from ..errors import UserError
from .base import Defense, make_defense
from .finetune import FineTune
from .lora import LoRA
from .muscle import GA, GALoRA, LoRAMSLR, MuScleLoRA

DEFENSES: dict[str, type[Defense]] = {"finetune": FineTune, "lora": LoRA, "ga": GA, "ga-lora": GALoRA,
                                      "lora-mslr": LoRAMSLR, "muscle-lora": MuScleLoRA}


def get_defense(name: str, **options) -> Defense:
    if name not in DEFENSES:
        raise UserError(f"unknown defense '{name}' (choose from {', '.join(DEFENSES)})")
    return make_defense(DEFENSES[name], options)


__all__ = ["Defense", "FineTune", "LoRA", "GA", "GALoRA", "LoRAMSLR", "MuScleLoRA", "DEFENSES", "get_defense", "make_defense"]
