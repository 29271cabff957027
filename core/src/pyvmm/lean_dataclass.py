"""``lean_dataclass``: a dataclass that costs less to *define*, for the records
every ``pyvmm`` command defines at start-up.

``dataclasses.dataclass`` writes the source of each method it adds and
compiles it: ``__init__``, ``__repr__`` and ``__eq__`` for every class, plus
``__setattr__``, ``__delattr__`` and ``__hash__`` for a frozen one.  On
CPython 3.11 that is ~0.6 ms per frozen class; the ~40 records imported by
``pyvmm run`` spent ~25 ms in the compiler before the guest's first
instruction (issue 19: the whole command should cost at most 9 ``python -c
pass``).  Here only ``__init__`` is compiled; the other methods are shared
functions bound to each class's field names, which behave as dataclasses'
own do (same ``repr``, the same class-only equality, the same hash), and the
class is still a real dataclass (``dataclasses.fields``, ``replace`` and
``asdict`` work).

Frozen records are write-once rather than compiled frozen: a field can be
assigned while it has no value (which is what ``__init__`` does) and never
again; assigning or deleting afterwards raises
:class:`dataclasses.FrozenInstanceError`, as a frozen dataclass does.
(``__post_init__`` normalises through ``object.__setattr__``, as with a
frozen dataclass.)  Type checkers see a frozen dataclass through
``dataclass_transform``.

Use it for records defined on the start-up path; anything else may use
``dataclasses.dataclass`` as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

_C = TypeVar("_C", bound=type)

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**_: Any) -> Callable[[_C], _C]:
        return lambda decorator: decorator


@overload
def lean_dataclass(cls: _C, /) -> _C: ...


@overload
def lean_dataclass(*, frozen: bool = False, slots: bool = False, kw_only: bool = False) -> Callable[[_C], _C]: ...


@dataclass_transform(field_specifiers=(dataclasses.field, dataclasses.Field))
def lean_dataclass(
    cls: _C | None = None, /, *, frozen: bool = False, slots: bool = False, kw_only: bool = False
) -> _C | Callable[[_C], _C]:
    """``dataclasses.dataclass(cls, frozen=..., slots=..., kw_only=...)`` with
    ``eq`` and ``repr`` (and, frozen, ``hash``), built without compiling them."""

    def wrap(cls: _C) -> _C:
        for name in ("__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__"):
            if name in cls.__dict__ and not (name == "__hash__" and cls.__dict__[name] is None):
                raise TypeError(f"{cls.__qualname__} defines {name}: use dataclasses.dataclass for it")
        made = cast(_C, dataclasses.dataclass(cls, repr=False, eq=False, frozen=False, slots=slots, kw_only=kw_only))
        fields = dataclasses.fields(made)
        made.__repr__ = _repr_of(tuple(f.name for f in fields if f.repr))  # type: ignore[assignment]
        compared = _values_of(tuple(f.name for f in fields if f.compare))
        made.__eq__ = _eq_of(compared)  # type: ignore[assignment]
        if frozen:
            hashed = _values_of(tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash)))
            made.__hash__ = _hash_of(hashed)  # type: ignore[assignment,method-assign]
            made.__setattr__ = _set_once_slotted if slots else _set_once  # type: ignore[assignment,method-assign]
            made.__delattr__ = _refuse_delete  # type: ignore[assignment,method-assign]
        else:
            # A mutable dataclass with eq has no hash, as dataclasses decides.
            made.__hash__ = None  # type: ignore[assignment]
        return made

    return wrap if cls is None else wrap(cls)


def _values_of(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """A function giving the values of ``names`` as a tuple (what dataclasses compares)."""
    if not names:
        return lambda _: ()
    if len(names) == 1:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return attrgetter(*names)


def _eq_of(values: Callable[[Any], tuple[Any, ...]]) -> Callable[[Any, Any], Any]:
    def equal(self: Any, other: Any) -> Any:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    return equal


def _hash_of(values: Callable[[Any], tuple[Any, ...]]) -> Callable[[Any], int]:
    def hashed(self: Any) -> int:
        return hash(values(self))

    return hashed


def _repr_of(names: tuple[str, ...]) -> Callable[[Any], str]:
    def show(self: Any) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{self.__class__.__qualname__}({shown})"

    return show


def _set_once(self: Any, name: str, value: Any) -> None:
    if name in self.__dict__:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
    object.__setattr__(self, name, value)


def _set_once_slotted(self: Any, name: str, value: Any) -> None:
    if hasattr(self, name):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
    object.__setattr__(self, name, value)


def _refuse_delete(self: Any, name: str) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
