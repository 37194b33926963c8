from __future__ import annotations

from dataclasses import dataclass

from .base import Defense


@dataclass
class FineTune(Defense):
    """Plain full fine-tuning: no defense. The reference point every defense is measured against."""

    name = "finetune"
