"""Argument checks shared by the package. Errors name the argument and the allowed values."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MIN_BIT_WIDTH = 2
MAX_BIT_WIDTH = 16


def check_bit_width(value: Any, name: str = "bit_width") -> int:
    """Return ``value`` as an int bit width, or raise a ``ValueError`` naming ``name``.

    Allowed values are the integers ``2..16``, Python or NumPy (an integral float such as
    ``4.0`` is accepted).
    """
    allowed = f"an integer from {MIN_BIT_WIDTH} to {MAX_BIT_WIDTH}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if isinstance(value, (float, np.floating)) and (not math.isfinite(value) or not float(value).is_integer()):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if not MIN_BIT_WIDTH <= int(value) <= MAX_BIT_WIDTH:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer (Python or NumPy, not a bool) ``>= minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        ok = False
    else:
        ok = minimum is None or value >= minimum
    if not ok:
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def check_positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    """Return ``value`` if it is an int ``>= 1`` (or ``>= 0``), else raise ``ValueError``."""
    return check_int(value, name, minimum=0 if allow_zero else 1)


def check_seed(value: Any, name: str = "seed", *, non_negative: bool = False) -> int:
    """Return ``value`` if it is an integer seed (``>= 0`` when ``non_negative``), else raise ``ValueError``."""
    return check_int(value, name, minimum=0 if non_negative else None)


def check_probability(value: Any, name: str) -> float:
    """Return ``value`` as a float if it lies strictly between 0 and 1, else raise ``ValueError``."""
    return check_number(value, name, low=0.0, high=1.0, low_open=True, high_open=True)


def check_number(
    value: Any, name: str, *, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> float:
    """Return ``value`` as a float if it is a finite number (Python or NumPy) in the interval, else raise ``ValueError``."""
    ok = (
        not isinstance(value, (bool, np.bool_))
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
    )
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} must be a finite number in {left}{low:g}, {high:g}{right}, got {value!r}")
    return float(value)
