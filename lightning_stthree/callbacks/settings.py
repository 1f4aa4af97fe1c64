"""Callback attributes that are settings of the functional core's objects: ``ST3PruningCallback.target_sparsity`` is
its :class:`~lightning_stthree.core.schedule.SparsitySchedule`'s, ``criterion`` its
:class:`~lightning_stthree.core.tracking.ThresholdTracker`'s. Reading gives the object's value; assigning goes through
the object's own checks, so a refused value changes nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_stthree.core.checks import check_bool
from lightning_stthree.core.schedule import ScheduleError


def schedule_setting(name: str, doc: str) -> property:
    """A callback attribute that is a setting of its :class:`SparsitySchedule` (assigning validates and rebuilds it)."""

    def get(callback: Any) -> Any:
        return getattr(callback.schedule, name)

    def set_(callback: Any, value: Any) -> None:
        with callback._as_misconfiguration():
            callback.schedule = callback.schedule.replace(**{name: value})

    return property(get, set_, doc=doc)


def tracker_setting(name: str, doc: str) -> property:
    """A callback attribute kept by its :class:`ThresholdTracker` (assigning validates it)."""

    def get(callback: Any) -> Any:
        return getattr(callback.tracker, name)

    def set_(callback: Any, value: Any) -> None:
        callback.tracker.set(name, value)

    return property(get, set_, doc=doc)


def optional_bool_setting(name: str, doc: str) -> property:
    """A callback attribute kept as ``_<name>``: ``True``, ``False`` or ``None`` (assigning validates it)."""

    def get(callback: Any) -> Any:
        return getattr(callback, f"_{name}")

    def set_(callback: Any, value: Any) -> None:
        setattr(callback, f"_{name}", check_bool(name, value, allow_none=True))

    return property(get, set_, doc=doc)


@contextlib.contextmanager
def schedule_errors_as_misconfiguration() -> Iterator[None]:
    """Schedule problems only the trainer reveals are the user's configuration: ``MisconfigurationException``."""
    try:
        yield
    except ScheduleError as error:
        raise MisconfigurationException(f"ST3PruningCallback: {error}") from error
