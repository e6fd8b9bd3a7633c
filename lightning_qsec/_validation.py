"""Argument checks shared by the package. Errors name the argument and the allowed values."""

from __future__ import annotations

import math
from typing import Any

MIN_BIT_WIDTH = 2
MAX_BIT_WIDTH = 16


def check_bit_width(value: Any, name: str = "bit_width") -> int:
    """Return ``value`` as an int bit width, or raise a ``ValueError`` naming ``name``.

    Allowed values are the integers ``2..16`` (an integral float such as ``4.0`` is accepted).
    """
    allowed = f"an integer from {MIN_BIT_WIDTH} to {MAX_BIT_WIDTH}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if not MIN_BIT_WIDTH <= int(value) <= MAX_BIT_WIDTH:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    """Return ``value`` if it is an int ``>= 1`` (or ``>= 0``), else raise ``ValueError``."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_number(
    value: Any, name: str, *, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> float:
    """Return ``value`` as a float if it is a finite number in the interval, else raise ``ValueError``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} must be a finite number in {left}{low:g}, {high:g}{right}, got {value!r}")
    return float(value)
