"""Validation of the API records (VmConfig, MemoryRegionSpec, BootSpec, the
backend manifest), written by hand instead of with pydantic.

These records are built on every ``pyvmm run`` and by ``pyvmm backends``;
importing pydantic and building its validators costs more than the rest of
those commands together (issue 19), so the records are slotted dataclasses
whose ``__post_init__`` checks every field with the helpers here.  pydantic
stays only for the config file's ``[plugins]`` table (:mod:`pyvmm.config_file`).

A bad value raises :class:`RecordError`, a :class:`~pyvmm.errors.ConfigError`
whose message is one line, ``field: problem; field: problem``, in the words
pyvmm uses for pydantic's errors where it still uses pydantic
(:mod:`pyvmm.validation`), and whose
:attr:`~RecordError.fields` names the fields at fault.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from pyvmm.errors import ConfigError

_E = TypeVar("_E", bound=enum.Enum)
_R = TypeVar("_R")

#: At most this many problems are listed in one message (a random machine file can have thousands).
MAX_PROBLEMS = 10


def show(value: Any) -> str:
    """``value`` for an error message, cut short: the input may be huge."""
    text = repr(value) if isinstance(value, (bool, int, float, str, bytes)) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def bound(value: int) -> str:
    """A limit or a value for a message: addresses and register widths read
    better in hex, counts in decimal."""
    return f"{value:#x}" if abs(value) >= 0x10000 else str(value)


def did_you_mean(word: str, known: list[str]) -> str | None:
    """The known key ``word`` was probably meant to be (``legacy-bios`` ->
    ``legacy_bios``), or None."""
    import difflib

    normal = word.replace("-", "_").lower()
    if normal in known:
        return normal
    close = difflib.get_close_matches(normal, known, n=1, cutoff=0.6)
    return close[0] if close else None


class RecordError(ConfigError):
    """One or more fields of an API record are invalid.

    :param record: the record's class name (for ``repr``, not the message).
    :param problems: ``(field, problem)`` pairs; the field may be dotted
        (``registers.rbx``).
    """

    def __init__(self, record: str, problems: list[tuple[str, str]]) -> None:
        lines = [f"{field}: {problem}" for field, problem in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            lines.append(f"and {len(problems) - MAX_PROBLEMS} more")
        super().__init__("; ".join(lines))
        self.record = record
        self.problems = tuple(problems)

    @property
    def fields(self) -> tuple[str, ...]:
        """The top-level fields at fault, in the order found."""
        return tuple(dict.fromkeys(field.split(".", 1)[0] for field, _ in self.problems))


class Checker:
    """Collects the problems of one record's fields; :meth:`done` raises them all.

    Each check returns the value normalised (an enum member for its value, a
    plain ``int`` for an ``IntEnum``) or the value as given when it is wrong, so
    the caller can go on checking the other fields.
    """

    def __init__(self, record: str) -> None:
        self.record = record
        self.problems: list[tuple[str, str]] = []

    def fail(self, field: str, problem: str) -> None:
        self.problems.append((field, problem))

    def integer(self, field: str, value: Any, lo: int, hi: int, *, optional: bool = False) -> Any:
        """An integer in ``lo..hi``; booleans, floats and numeric strings are refused."""
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"must be an integer from {bound(lo)} to {bound(hi)}, not {show(value)}")
            return value
        if not lo <= value <= hi:
            self.fail(field, f"{bound(value)} is out of range: must be from {bound(lo)} to {bound(hi)}")
            return value
        return int(value)

    def number(self, field: str, value: Any, lo_exclusive: float, hi: float) -> Any:
        """A finite number in ``(lo, hi]``."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"must be a finite number above {lo_exclusive:g} and at most {hi:g}, not {show(value)}")
            return value
        if not math.isfinite(value) or not lo_exclusive < value <= hi:
            self.fail(field, f"{value!r} is out of range: must be above {lo_exclusive:g} and at most {hi:g}")
            return value
        return float(value)

    def boolean(self, field: str, value: Any) -> Any:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false, not {show(value)}")
        return value

    def text(self, field: str, value: Any, *, min_length: int = 0) -> Any:
        if not isinstance(value, str):
            self.fail(field, f"must be a string{_given(value)}")
        elif len(value) < min_length:
            self.fail(field, "must not be empty")
        return value

    def choice(self, field: str, value: Any, kind: type[_E]) -> Any:
        """A member of the enum ``kind``, or one of its values."""
        if isinstance(value, kind):
            return value
        members = _members_by_value.get(kind)
        if members is None:  # once per enum: iterating its members costs µs on every record
            members = _members_by_value[kind] = {member.value: member for member in kind}
        try:
            member = members.get(value)
        except TypeError:  # unhashable: no member's value
            member = None
        # ``True == 1``: the type must match too, as the values are compared.
        # (``_value_``, not the ``value`` property: two Python calls less per record.)
        if member is not None and type(value) is type(member._value_):
            return member
        names = [str(member.value) for member in kind]
        expected = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        self.fail(field, f"must be {expected}{_given(value)}")
        return value

    def done(self) -> None:
        """:raises RecordError: any check failed."""
        if self.problems:
            raise RecordError(self.record, self.problems)


#: Per enum type checked by :meth:`Checker.choice`: its members by value.
_members_by_value: dict[type[enum.Enum], dict[Any, Any]] = {}


def _given(value: Any) -> str:
    return f", not {show(value)}" if isinstance(value, (bool, int, float, str, bytes)) else ""


def from_mapping(
    cls: type[_R],
    data: Any,
    fields: tuple[str, ...],
    what: str | None = None,
    error: type[RecordError] = RecordError,
) -> _R:
    """``cls(**data)`` for a mapping of the record's fields: a value that is no
    mapping, or an unknown key (named with the closest known one), is an
    ``error`` too, never a ``TypeError``; the problems of the known keys are
    reported with those of the unknown ones."""
    name = what or cls.__name__
    if type(data) is not dict and not isinstance(data, Mapping):  # a dict skips the ABC check
        raise error(name, [("(record)", f"must be a table{_given(data)}")])
    unknown = []
    for key in data:
        if key not in fields:
            hint = did_you_mean(str(key), list(fields))
            unknown.append((str(key), "unknown setting" + (f" (did you mean {hint}?)" if hint else "")))
    try:
        # Every key known (the usual case): the mapping itself is the keywords.
        record = cls(**data) if not unknown else cls(**{key: value for key, value in data.items() if key in fields})
    except RecordError as exc:
        if not unknown:
            raise
        # Only the fields' own problems: rules between fields are not checked
        # on a record that has others.
        raise error(name, [*[p for p in exc.problems if not p[1].startswith("needs ")], *unknown]) from None
    if unknown:
        raise error(name, unknown)
    return record


def required(checker: Checker, field: str, value: Any) -> bool:
    """False (with the problem recorded) when a required field was left out."""
    if value is MISSING:
        checker.fail(field, "is required")
        return False
    return True


class _Missing:
    """The default of a required field of a record that takes keywords only
    (so that leaving it out is reported like every other problem)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
