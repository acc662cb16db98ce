"""Numbers and flags that callers pass, checked where they enter: any Python numeric type is taken (int and float,
numpy scalars, 0-d torch tensors), bools are not numbers, and a refusal names the setting, the rule and the value.
"""

import math
import operator
from typing import Optional


def whole_number(value, name: str, minimum: Optional[int] = 1, allowed: tuple = ()) -> int:
    """`value` as an int, if it is an integer of at least `minimum` (None: no minimum) or one of `allowed`.
    Raises ValueError saying what `name` must be."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or (number not in allowed and minimum is not None and number < minimum):
        rule = {None: "an integer", 0: "an integer >= 0", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}"
        )
        alternatives = "".join(f" or {option}" for option in allowed)
        raise ValueError(f"{name} must be {rule}{alternatives}, got {value!r}")
    return number


def real_number(value, name: str, rule: str, within=lambda number: 0 < number < math.inf) -> float:
    """`value` as a float, if it is a real number (not NaN) for which `within(number)` holds, by default a
    positive finite one. Raises ValueError saying that `name` must be `rule`."""
    number = None
    if not isinstance(value, (bool, str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
            number = None
    if number is None or math.isnan(number) or not within(number):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return number


def flag(value, name: str) -> bool:
    """`value` if it is True or False (numpy's booleans too). Raises TypeError otherwise."""
    if type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")
