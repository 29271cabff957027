"""pydantic field types with pyvmm's strictness, and pyvmm's wording of
pydantic's errors: for the files pydantic validates (machine files, the config
file's tables).

The API records (:mod:`pyvmm.config`, :mod:`pyvmm.boot`, :mod:`pyvmm.manifest`)
do not use pydantic (:mod:`pyvmm.records` says why); importing this module
imports pydantic.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationError

from pyvmm.config import parse_size
from pyvmm.records import MAX_PROBLEMS, bound, did_you_mean, show

_show = show
_bound = bound

#: A byte count; accepts ``"128M"``-style strings.
ByteSize = Annotated[int, BeforeValidator(parse_size)]


def int_range(lo: int, hi: int, *, optional: bool = False) -> BeforeValidator:
    """``Annotated[int, int_range(lo, hi)]``: an integer in ``lo..hi`` inclusive.

    Booleans, floats and strings are refused (pydantic's lax mode would turn
    ``True`` into 1 and ``"7"`` into 7); the message gives the allowed range.
    With ``optional``, None passes (for ``int | None`` fields).
    """

    def check(value: Any) -> Any:
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer from {_bound(lo)} to {_bound(hi)}, not {_show(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"{_bound(value)} is out of range: must be from {_bound(lo)} to {_bound(hi)}")
        return int(value)  # an IntEnum member becomes its plain value

    return BeforeValidator(check)


def float_range(lo_exclusive: float, hi: float, *, optional: bool = False) -> BeforeValidator:
    """``Annotated[float, float_range(lo, hi)]``: a finite number in ``(lo, hi]``;
    booleans, strings, infinities and NaN are refused."""

    def check(value: Any) -> Any:
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a finite number above {lo_exclusive:g} and at most {hi:g}, not {_show(value)}")
        if not math.isfinite(value) or not lo_exclusive < value <= hi:
            raise ValueError(f"{value!r} is out of range: must be above {lo_exclusive:g} and at most {hi:g}")
        return float(value)

    return BeforeValidator(check)


def strict_bool(value: Any) -> Any:
    """A :class:`BeforeValidator` for bool fields: only ``True`` and ``False``
    (lax pydantic would take 1, "yes" or "on")."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_show(value)}")
    return value


#: ``Annotated[bool, StrictBool]``.
StrictBool = BeforeValidator(strict_bool)


#: pydantic's wording, by error type, as one clause: "must be ...".
_PYDANTIC_WORDS = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "path_type": "must be a file name (a string)",
    "string_too_short": "must not be empty",
    "string_too_long": "is too long",
    "greater_than": "must be above {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be below {lt}",
    "less_than_equal": "must be at most {le}",
    "enum": "must be {expected}",
    "literal_error": "must be {expected}",
    "int_parsing": "must be an integer",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "frozen_instance": "cannot be changed",
}


def _given(value: Any) -> str:
    return f", not {_show(value)}" if isinstance(value, (bool, int, float, str, bytes)) else ""


def error_text(item: Any, known: list[str] | None = None) -> str:
    """One pydantic error in pyvmm's words: our validators' messages as they are
    (without pydantic's "Value error, " prefix), pydantic's own rewritten
    ("must be a string, not 5"), and an unknown key with the closest known one
    (``known``: the keys allowed where it was found)."""
    kind = item.get("type", "")
    if kind == "value_error":
        return str(item["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        key = str(item["loc"][-1]) if item.get("loc") else ""
        hint = did_you_mean(key, known or [])
        return "unknown setting" + (f" (did you mean {hint}?)" if hint else "")
    template = _PYDANTIC_WORDS.get(kind)
    if template is None:
        text = str(item["msg"])
        text = text.replace("Input should be", "must be").replace("Value error, ", "")
        return text[:1].lower() + text[1:]
    context = {k: str(v).replace("'", "") for k, v in (item.get("ctx") or {}).items()}
    try:
        text = template.format(**context)
    except (KeyError, IndexError):
        text = template
    return text + ("" if kind == "missing" else _given(item.get("input")))


def known_keys(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys a pydantic model allows at ``loc`` (the location of an unknown
    key, which is its last part), following nested models and lists of them."""
    import typing

    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = None
        for candidate in (annotation, *typing.get_args(annotation)):
            if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                current = candidate
                break
        if current is None:
            return []
    fields = getattr(current, "model_fields", None) or {}
    return [field.alias or name for name, field in fields.items()]


def validation_message(error: ValidationError, model: Any = None) -> str:
    """One line for all problems: ``field.path: message; ...`` (the first
    :data:`MAX_PROBLEMS`, then how many more), in pyvmm's words
    (:func:`error_text`); ``model`` lets an unknown key get a "did you mean"."""
    items = error.errors()
    lines = []
    for item in items[:MAX_PROBLEMS]:
        where = ".".join(str(part) for part in item["loc"]) or "(record)"
        known = known_keys(model, tuple(item["loc"])) if model is not None and item["loc"] else None
        lines.append(f"{where}: {error_text(item, known)}")
    if len(items) > MAX_PROBLEMS:
        lines.append(f"and {len(items) - MAX_PROBLEMS} more")
    return "; ".join(lines)


# --- files named by the user ----------------------------------------------------------
