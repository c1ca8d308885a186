"""``@record``: the immutable value type of the per-message hot paths.

To the type checker a ``@record`` class is a frozen dataclass (its fields are
read-only, ``dataclass_transform(frozen_default=True)``). At run time it is a
slotted dataclass whose ``__init__`` assigns its fields directly: a frozen
dataclass's goes through ``object.__setattr__`` for each field, which made
creating a ``PublishOptions`` 2.5 times slower (1.6 against 0.6 µs), and a
publication creates several of these. Equality and hashing are a frozen
dataclass's (by fields). Only plain values go in: nothing here stops an
assignment at run time, mypy does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, dataclass_transform, overload

T = TypeVar("T")


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(*, kw_only: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(frozen_default=True)
def record(cls: Any = None, /, *, kw_only: bool = False) -> Any:
    def wrap(c: type[T]) -> type[T]:
        return dataclass(c, slots=True, kw_only=kw_only, unsafe_hash=True)

    return wrap if cls is None else wrap(cls)
