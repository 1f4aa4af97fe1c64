"""Argument checks, one helper per kind of argument, used by every constructor of the package and its recipes.

The same mistake gets the same exception everywhere: ``TypeError`` when the value has the wrong type, ``ValueError``
when it has the right type but is out of range or not among the allowed choices. Every message names the argument in
backticks, shows the value received and says what is allowed (LightningCLI prints it word for word):
``ValueError("`target_sparsity` must be in [0, 1), got 1.5")``. ``bool`` is never accepted as a number.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any

_INTERVAL_ENDS = ("[]", "[)", "(]", "()")


def check_bool(name: str, value: object, allow_none: bool = False) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (or ``None``, with ``allow_none``).

    Raises:
        TypeError: Otherwise (``0``, ``1``, ``"yes"`` and ``None`` included).

    Example::

        >>> check_bool("rescale", "yes")
        Traceback (most recent call last):
        ...
        TypeError: `rescale` must be True or False, got 'yes'
    """
    if allow_none and value is None:
        return value  # type: ignore[return-value]
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True{', False or None' if allow_none else ' or False'}, got {value!r}")
    return value


def check_int(name: str, value: object, minimum: int | None = None, unit: str | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer (``int``, ``numpy.int64``, ...; not a ``bool``), ``>=
    minimum``.

    Args:
        name: The argument's name.
        value: What was given.
        minimum: The smallest allowed value, if any.
        unit: What the number counts, shown in the message (e.g. ``"optimizer steps"``).

    Raises:
        TypeError: If ``value`` is not an ``int`` (``2.0`` and ``True`` included).
        ValueError: If it is below ``minimum``.

    Example::

        >>> check_int("update_every", 0, minimum=1, unit="optimizer steps")
        Traceback (most recent call last):
        ...
        ValueError: `update_every` must be an int >= 1 (optimizer steps), got 0
    """
    allowed = "an int" + ("" if minimum is None else f" >= {minimum}") + ("" if unit is None else f" ({unit})")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be {allowed}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    closed: str = "[]",
    finite: bool = True,
) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number (``int``, ``float``, ``numpy.float32``, ...; not a
    ``bool``) in the interval from ``low`` to ``high``.

    Args:
        name: The argument's name.
        value: What was given.
        low: The interval's lower end.
        high: The interval's upper end.
        closed: Which ends are included: ``"[]"``, ``"[)"``, ``"(]"`` or ``"()"``.
        finite: Refuse infinities; ``False`` lets an infinite end of the interval be given when ``closed`` includes
            it (``min_speedup=math.inf``). NaN is always refused.

    Raises:
        TypeError: If ``value`` is not a real number (a ``bool`` or a string included).
        ValueError: If it is NaN, infinite (with ``finite``) or outside the interval.

    Example::

        >>> check_number("target_sparsity", 1.5, 0.0, 1.0, "[)")
        Traceback (most recent call last):
        ...
        ValueError: `target_sparsity` must be in [0, 1), got 1.5
    """
    if closed not in _INTERVAL_ENDS:
        raise ValueError(f"`closed` must be one of {_INTERVAL_ENDS}, got {closed!r}")
    interval = f"{closed[0]}{low:g}, {high:g}{closed[1]}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number in {interval}, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number) or (finite and math.isinf(number)):
        kind = "a finite number" if finite else "a number"
        raise ValueError(f"`{name}` must be {kind} in {interval}, got {value!r}")
    above = number >= low if closed[0] == "[" else number > low
    below = number <= high if closed[1] == "]" else number < high
    if not (above and below):
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}")
    return number


def check_choice(name: str, value: object, choices: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``.

    Raises:
        TypeError: If ``value`` is not of the choices' type (e.g. a number where the choices are strings).
        ValueError: If it is of their type but not among them.

    Example::

        >>> check_choice("criterion", "l2", ("l1", "l1_std"))
        Traceback (most recent call last):
        ...
        ValueError: `criterion` must be one of ('l1', 'l1_std'), got 'l2'
    """
    message = f"`{name}` must be one of {tuple(choices)}, got {value!r}"
    if not any(type(value) is type(choice) for choice in choices):
        raise TypeError(message)
    if value not in choices:
        raise ValueError(message)
    return value


def check_strings(name: str, value: object, what: str) -> tuple[str, ...]:
    """Return ``value`` as a tuple if it is a list, tuple or set of non-empty strings (a set sorted, so that the result
    is the same in every process).

    Args:
        name: The argument's name.
        value: What was given.
        what: What the strings are, for the message (e.g. ``"layer type names"``).

    Raises:
        TypeError: If ``value`` is a single string, not a sequence, or holds something other than non-empty strings.
    """
    if isinstance(value, str) or not isinstance(value, (Sequence, AbstractSet)):
        raise TypeError(f"`{name}` must be a list of {what}, got {value!r}")
    if not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"`{name}` must be a list of {what}, got {value!r}")
    return tuple(sorted(value)) if isinstance(value, AbstractSet) else tuple(value)


def check_shape(name: str, value: object) -> list[int]:
    """Return ``value`` as a list if it is a non-empty list of positive ints (a tensor shape, batch first).

    Raises:
        TypeError: If ``value`` is not a list or tuple of ints.
        ValueError: If it is empty or has a dimension ``< 1``.
    """
    allowed = "a list of positive ints, batch dimension first (e.g. [1, 3, 224, 224])"
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"`{name}` must be {allowed}, got {value!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise TypeError(f"`{name}` must be {allowed}, got {value!r}")
    if len(value) == 0 or any(d < 1 for d in value):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return list(value)
