"""Precisions to evaluate: ``8``, ``(4, 8)`` or ``"w4a8"``."""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from lightning_qsec._validation import check_bit_width

__all__ = ["Precision", "PrecisionLike", "parse_precisions"]

PrecisionLike = Union[int, str, Sequence[int], "Precision"]
_PATTERN = re.compile(r"^w(\d+)a(\d+)$")


@dataclass(frozen=True)
class Precision:
    """A weight and an activation bit width, labelled ``"w{weight}a{act}"``."""

    weight_bit_width: int
    act_bit_width: int

    @property
    def label(self) -> str:
        return f"w{self.weight_bit_width}a{self.act_bit_width}"

    @classmethod
    def parse(cls, value: PrecisionLike, argument: str = "bit_widths") -> Precision:
        """Read ``8`` (w8a8), ``(4, 8)`` / ``[4, 8]`` (w4a8) or ``"w4a8"``.

        Raises:
            ValueError: naming ``argument`` and the allowed forms.
        """
        if isinstance(value, Precision):
            return value
        if isinstance(value, str):
            match = _PATTERN.match(value.strip())
            if not match:
                raise ValueError(
                    f"{argument} entry {value!r} is not a precision: use an int bit width 2..16, "
                    "a (weight, act) pair, or a string like 'w4a8'"
                )
            w, a = int(match.group(1)), int(match.group(2))
        elif isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"{argument} entry {value!r} must be a (weight, act) pair")
            w, a = value  # type: ignore[misc]
        else:
            w = a = value  # type: ignore[assignment]
        return cls(check_bit_width(w, f"{argument} weight bit width"), check_bit_width(a, f"{argument} act bit width"))


def parse_precisions(values: Sequence[PrecisionLike], argument: str = "bit_widths") -> list[Precision]:
    """Parse a non-empty sequence of precisions, dropping duplicates in order."""
    if isinstance(values, (str, numbers.Number, Precision)):
        values = [values]
    if not isinstance(values, Sequence):
        raise ValueError(f"{argument} must be a precision or a sequence of precisions, got {values!r}")
    out: list[Precision] = []
    for v in values:
        p = Precision.parse(v, argument)
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError(f"{argument} must name at least one precision")
    return out
