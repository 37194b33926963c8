"""Backdoor attacks on the benchmark side. Each is a pure function of (dataset, settings, seed)."""

from __future__ import annotations

from .base import Attack, PoisonedBenchmark
from .badnets import BadNets
from .addsent import AddSent
from .paraphrase import Syntactic, Style
from ..errors import UserError
from ..options import check_values

ATTACKS: dict[str, type[Attack]] = {"badnets": BadNets, "addsent": AddSent, "syntactic": Syntactic, "style": Style}


def get_attack(name: str, **settings) -> Attack:
    if name not in ATTACKS:
        raise UserError(f"unknown attack '{name}' (choose from {', '.join(ATTACKS)})")
    return ATTACKS[name](**check_values(ATTACKS[name], settings, f"attack '{name}'"))


__all__ = ["Attack", "PoisonedBenchmark", "BadNets", "AddSent", "Syntactic", "Style", "ATTACKS", "get_attack"]
