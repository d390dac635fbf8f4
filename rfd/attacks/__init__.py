"""Query-based black-box attacks run by one engine with exact query accounting.

    res = rfd.attack(net, images, labels, attack="square", norm="linf", eps=0.05,
                     max_queries=1000, criterion="vote", eot=1, seed=0)
    res.adv, res.success, res.queries, res.verify_queries, res.clean_correct, res.fooled_at
    res.robust_accuracy(200)      # robust accuracy had the budget been 200 queries
    res.summary()

``ATTACKS`` maps each registered name to its class. Every module of this package is imported
here, and defining an :class:`Attack` subclass with a ``name`` registers it, so a new attack is
one module (plus its ``configs/attack/<name>.yaml`` and tests), nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from rfd.attacks.base import (
    ATTACKS,
    CRITERIA,
    KINDS,
    MAJORITY,
    NORMS,
    SUCCESS_RULES,
    VOTES,
    AccessError,
    Attack,
    AttackResult,
    BudgetError,
    Reply,
    State,
    View,
    check_eps,
    default_eps,
    select,
)
from rfd.attacks.engine import Cell, CellStats, Engine, EngineRun, Progress

_INFRASTRUCTURE = {"base", "engine", "api"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_m.name}")
_sorted = sorted(ATTACKS.items(), key=lambda kv: (kv[1].order, kv[0]))
ATTACKS.clear()
ATTACKS.update(_sorted)

from rfd.attacks.api import attack, make_attack  # noqa: E402

__all__ = [
    "ATTACKS",
    "CRITERIA",
    "KINDS",
    "MAJORITY",
    "NORMS",
    "SUCCESS_RULES",
    "VOTES",
    "AccessError",
    "Attack",
    "AttackResult",
    "BudgetError",
    "Cell",
    "CellStats",
    "Engine",
    "EngineRun",
    "Progress",
    "Reply",
    "State",
    "View",
    "attack",
    "check_eps",
    "default_eps",
    "make_attack",
    "select",
]
