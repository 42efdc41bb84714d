"""Checks of the numbers a user passes to slimseg's functions, each failure one line.

Python and NumPy numbers and 0-d tensors or arrays are accepted wherever a number is;
booleans never are (``True`` is an ``int`` to Python, but never what a user meant by 1), nor
are strings, NaN or infinities.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

from slimseg.errors import SlimsegError

__all__ = ["as_integer", "as_real", "is_finite_number", "real_problem", "scalar"]


def scalar(value: Any) -> Any:
    """A 0-d tensor or array as the Python number it holds (a bool stays a bool); anything
    else as is."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        return value.item()
    return value


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float as JSON gives them (``true`` is not 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_real(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    return isinstance(value, Integral) or math.isfinite(value)  # isfinite overflows on huge ints


def _bounds(minimum: float | None, maximum: float | None, maximum_open: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum:g}, {maximum:g}{')' if maximum_open else ']'}"
    if minimum is not None:
        return f" >= {minimum:g}"
    if maximum is not None:
        return f" {'<' if maximum_open else '<='} {maximum:g}"
    return ""


def real_problem(value: Any, minimum: float | None = None, maximum: float | None = None,
                 maximum_open: bool = False) -> str | None:
    """Why ``value`` is not a finite real number in [minimum, maximum] (``maximum`` itself
    excluded when ``maximum_open``), e.g. "must be in [0, 1]"; None when it is one."""
    value = scalar(value)
    bounds = _bounds(minimum, maximum, maximum_open)
    if not _is_real(value):
        return f"must be a finite number{bounds}"
    if ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)
            or (maximum_open and value == maximum)):
        return f"must be{bounds}"
    return None


def as_real(value: Any, what: str, minimum: float | None = None, maximum: float | None = None,
            maximum_open: bool = False) -> float:
    """``value`` as a float, or a ``SlimsegError`` naming ``what`` (see ``real_problem``)."""
    problem = real_problem(value, minimum, maximum, maximum_open)
    if problem is not None:
        raise SlimsegError(f"{what} {problem}, got {value!r}")
    return float(scalar(value))


def as_integer(value: Any, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int (Python or NumPy integers, not booleans, floats or strings) in
    [minimum, maximum], or a ``SlimsegError`` naming ``what``."""
    number = scalar(value)
    if (isinstance(number, bool) or not isinstance(number, Integral)
            or (minimum is not None and number < minimum) or (maximum is not None and number > maximum)):
        if minimum is not None and maximum is not None:
            bounds = f" >= {minimum} and <= {maximum}"
        else:
            bounds = _bounds(minimum, maximum, False)
        raise SlimsegError(f"{what} must be an integer{bounds}, got {value!r}")
    return int(number)
