"""One helper per kind of argument: TypeError for a wrong type, ValueError for a value out of range, everywhere."""

import math

import numpy as np
import pytest

from lightning_stthree.core.checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_shape,
    check_strings,
)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: check_bool("flag", 1), TypeError, r"^`flag` must be True or False, got 1$"),
        (lambda: check_bool("flag", None), TypeError, r"got None$"),
        (lambda: check_int("n", 2.0, minimum=1), TypeError, r"^`n` must be an int >= 1, got 2.0$"),
        (lambda: check_int("n", True), TypeError, r"^`n` must be an int, got True$"),
        (lambda: check_int("n", "3", minimum=0), TypeError, r"^`n` must be an int >= 0, got '3'$"),
        (lambda: check_int("n", 0, minimum=1, unit="steps"), ValueError, r"^`n` must be an int >= 1 \(steps\), got 0$"),
        (lambda: check_number("x", "0.5", 0, 1), TypeError, r"^`x` must be a number in \[0, 1\], got '0.5'$"),
        (lambda: check_number("x", False, 0, 1), TypeError, r"got False$"),
        (lambda: check_number("x", 1.0, 0, 1, "[)"), ValueError, r"^`x` must be in \[0, 1\), got 1.0$"),
        (lambda: check_number("x", 0, 0, 1, "(]"), ValueError, r"^`x` must be in \(0, 1\], got 0$"),
        (lambda: check_number("x", math.nan), ValueError, r"^`x` must be a finite number in \[-inf, inf\], got nan$"),
        (lambda: check_number("x", 0.5, 0, 1, "[["), ValueError, r"`closed` must be one of"),
        (lambda: check_choice("c", "b", ("a",)), ValueError, r"^`c` must be one of \('a',\), got 'b'$"),
        (lambda: check_choice("c", 3, ("a", "b")), TypeError, r"^`c` must be one of \('a', 'b'\), got 3$"),
        (lambda: check_number("x", 10**400, 0, 1), ValueError, r"^`x` must be a finite number in \[0, 1\], got 1000"),
        (lambda: check_number("x", np.float32("nan")), ValueError, r"must be a finite number"),
        (
            lambda: check_number("x", math.inf, 0, math.inf, "[)", finite=False),
            ValueError,
            r"^`x` must be in \[0, inf\)",
        ),
        (
            lambda: check_number("x", math.nan, finite=False),
            ValueError,
            r"^`x` must be a number in \[-inf, inf\], got nan$",
        ),
        (lambda: check_choice("c", True, (1, 2)), TypeError, r"got True$"),
        (lambda: check_strings("s", "ab", "names"), TypeError, r"^`s` must be a list of names, got 'ab'$"),
        (lambda: check_strings("s", ["a", ""], "names"), TypeError, r"got \['a', ''\]$"),
        (lambda: check_shape("shape", (1, 0)), ValueError, r"^`shape` must be a list of positive ints"),
        (lambda: check_shape("shape", []), ValueError, r"got \[\]$"),
        (lambda: check_shape("shape", [1, True]), TypeError, r"got \[1, True\]$"),
        (lambda: check_shape("shape", "1x3"), TypeError, r"got '1x3'$"),
    ],
)
def test_each_mistake_gets_its_exception_and_a_message_naming_argument_value_and_rule(
    call: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()  # type: ignore[operator]


def test_valid_values_come_back_normalised() -> None:
    assert check_bool("flag", False) is False
    assert check_int("n", 3, minimum=3) == 3
    assert check_number("x", 1, 0, 1) == 1.0
    assert isinstance(check_number("x", 1, 0, 1), float)
    assert check_choice("c", "a", ["a", "b"]) == "a"
    assert check_strings("s", ["fc", "layer4.*"], "patterns") == ("fc", "layer4.*")
    assert check_shape("shape", (1, 3, 8, 8)) == [1, 3, 8, 8]


def test_numpy_numbers_are_numbers_and_sets_of_names_are_sorted() -> None:
    assert check_number("x", np.float32(0.5), 0, 1) == 0.5
    assert check_number("x", math.inf, 0, math.inf, "[]", finite=False) == math.inf
    assert check_int("n", np.int64(4), minimum=1) == 4
    assert type(check_int("n", np.int64(4))) is int
    assert check_strings("s", {"Linear", "Conv2d"}, "names") == ("Conv2d", "Linear")
