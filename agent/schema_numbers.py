"""The one check of a bounded number in a manifest (agent.bundle and agent.tolerance).

A manifest's numbers are JSON numbers, so a bool (an int to Python) is refused, and
the range is named in the refusal so the builder knows what to write instead.
"""

from __future__ import annotations

import math
from typing import Any

from agent.bundle_errors import SchemaError
from agent.names import shown


def bounded_number(
    value: Any, where: str, low: float, high: float, *, open_low: bool = False
) -> float:
    """A finite JSON number in [low, high] (or (low, high] with open_low), else SchemaError."""
    bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SchemaError(
            f"manifest: field {where} is {type(value).__name__}, expected a number in {bounds}"
        )
    number = float(value)
    if not math.isfinite(number) or number > high or number < low or (open_low and number <= low):
        raise SchemaError(
            f"manifest: {where} is {shown(value)}; it must be a finite number in {bounds}"
        )
    return number


__all__ = ["bounded_number"]
