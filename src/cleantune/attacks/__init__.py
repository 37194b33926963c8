"""Backdoor attacks on the benchmark side. Each is a pure function of (dataset, settings, seed)."""

from __future__ import annotations

from dataclasses import fields

from .base import Attack, PoisonedBenchmark
from .badnets import BadNets
from .addsent import AddSent
from .paraphrase import Syntactic, Style
from ..errors import UserError

ATTACKS: dict[str, type[Attack]] = {"badnets": BadNets, "addsent": AddSent, "syntactic": Syntactic, "style": Style}


def get_attack(name: str, **settings) -> Attack:
    if not isinstance(name, str) or name not in ATTACKS:  # a list is unhashable: a TypeError of the dict
        raise UserError(f"unknown attack '{name}' (choose from {', '.join(ATTACKS)})")
    cls = ATTACKS[name]
    known = [f.name for f in fields(cls)]
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise UserError(f"attack '{name}' has no setting '{unknown[0]}' (settings: {', '.join(known)})")
    return cls(**settings)  # the values are checked in the attack's __post_init__, as for a direct call


__all__ = ["Attack", "PoisonedBenchmark", "BadNets", "AddSent", "Syntactic", "Style", "ATTACKS", "get_attack"]
