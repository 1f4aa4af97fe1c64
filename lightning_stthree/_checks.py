"""Argument checks shared by the callback, the DataModules and the models (messages name the argument)."""

from __future__ import annotations


def check_bool(name: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}")
