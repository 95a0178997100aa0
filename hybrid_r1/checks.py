"""Type and range checks of the numbers a user supplies: API arguments, command-line options, chat
settings, config keys. The type is checked, not coerced: a bool is not an int, 2.5 is not an int and
"4" is not a number; floats must be finite. Each failure is the caller's error class (InputError by
default), naming the value by the name the user wrote."""

from __future__ import annotations

import math
import numbers
import operator

from .errors import InputError


def _show(value) -> str:
    return repr(value) if not isinstance(value, str) or len(value) < 40 else repr(value[:37] + "...")


def integer(name: str, value, lo: int | None = None, hi: int | None = None, *, error=InputError) -> int:
    """`value` as an int in [lo, hi] (either bound may be None). Accepts Python and numpy integers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be an integer, got {_show(value)}")
    value = operator.index(value)
    _range(name, value, lo, hi, error)
    return value


def number(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, error=InputError) -> float:
    """`value` as a finite float in [lo, hi] ((lo or hi] with lo_open, hi_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and (value >= hi if hi_open else value > hi):
        if hi is None:
            raise error(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
        left = "(-inf" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
        right = "inf)" if hi is None else f"{hi:g}{')' if hi_open else ']'}"
        raise error(f"{name} must be in {left}, {right}, got {value:g}")
    return value


def boolean(name: str, value, *, error=InputError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{name} must be true or false, got {_show(value)}")
    return value


def _range(name: str, value: int, lo: int | None, hi: int | None, error) -> None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise error(f"{name} must be between {lo} and {hi}, got {value}")
    if lo is not None and value < lo:
        raise error(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise error(f"{name} must be <= {hi}, got {value}")
