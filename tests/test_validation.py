"""The shared checks of user-given numbers (slimseg.validation)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from slimseg.errors import SlimsegError
from slimseg.validation import as_integer, as_real, is_finite_number, real_problem


@pytest.mark.parametrize("value", [3, np.int64(3), torch.tensor(3), np.array(3)])
def test_integers_in_any_container_are_python_ints(value: object) -> None:
    result = as_integer(value, "count", 1, 3)
    assert result == 3 and type(result) is int


@pytest.mark.parametrize(("value", "minimum", "maximum", "message"), [
    (True, None, None, "count must be an integer, got True"),
    (2.0, None, None, "count must be an integer, got 2.0"),
    ("2", 1, None, "count must be an integer >= 1, got '2'"),
    (torch.tensor([2]), 1, None, "count must be an integer >= 1, got tensor([2])"),
    (0, 1, None, "count must be an integer >= 1, got 0"),
    (5, 0, 4, "count must be an integer >= 0 and <= 4, got 5"),
])
def test_integers_out_of_range_or_of_another_kind_are_refused(value: object, minimum: int | None,
                                                              maximum: int | None, message: str) -> None:
    with pytest.raises(SlimsegError, match=re.escape(message)):
        as_integer(value, "count", minimum, maximum)


@pytest.mark.parametrize("value", [0.25, 1, np.float32(0.25), torch.tensor(0.25), np.array(0.25)])
def test_reals_in_any_container_are_python_floats(value: object) -> None:
    result = as_real(value, "weight", 0, 1)
    assert result == pytest.approx(float(np.float32(value) if not isinstance(value, int) else value))
    assert type(result) is float


@pytest.mark.parametrize(("value", "bounds", "problem"), [
    (float("nan"), (None, None, False), "must be a finite number"),
    (float("inf"), (0, None, False), "must be a finite number >= 0"),
    (True, (0, 1, False), "must be a finite number in [0, 1]"),
    ("0.5", (0, 1, True), "must be a finite number in [0, 1)"),
    (1.0, (0, 1, True), "must be in [0, 1)"),
    (-0.5, (0, None, False), "must be >= 0"),
    (2, (None, 1, False), "must be <= 1"),
    (10 ** 400, (0, None, False), None),  # an int too large for a float is still a number
])
def test_real_problems_name_the_range(value: object, bounds: tuple, problem: str | None) -> None:
    assert real_problem(value, *bounds) == problem


def test_as_real_names_the_argument_and_the_value() -> None:
    with pytest.raises(SlimsegError, match=re.escape("sigma must be >= 0, got -1")):
        as_real(-1, "sigma", minimum=0)


@pytest.mark.parametrize(("value", "expected"), [
    (1, True), (0.5, True), (True, False), (float("nan"), False), ("1", False), (None, False),
])
def test_json_numbers(value: object, expected: bool) -> None:
    assert is_finite_number(value) is expected
