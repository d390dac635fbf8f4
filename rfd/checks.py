"""Number checks for constructor arguments: one rule and one message wherever a value enters.

The library's classes (data modules, the training module, defenses and their trained parts) check
their numeric arguments when they are built, so that a bad value is refused at the entry (train.py,
evaluate.py, ``rfd.protect``) rather than minutes into a run. The front ends turn the
``ValueError`` into one ``error:`` line (:func:`rfd.settings.run_cli`).
"""

from __future__ import annotations

import math
from typing import Any


def check_int(value: Any, what: str, low: int = 1) -> int:
    """An integer >= ``low``; bools and floats are refused, not truncated (``ValueError``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low} (got {value!r})")
    return value


def check_positive(value: Any, what: str, allow_zero: bool = False) -> float:
    """A finite real > 0 (>= 0 with ``allow_zero``) as a float; ``ValueError`` otherwise."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"{what} must be a finite number {'>=' if allow_zero else '>'} 0 (got {value!r})"
        )
    return float(value)
