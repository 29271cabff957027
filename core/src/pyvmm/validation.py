"""pyvmm's wording of pydantic's errors, for what pydantic still validates:
the config file's tables (:mod:`pyvmm.config_file`).

The API records and the machine settings do not use pydantic
(:mod:`pyvmm.records` says why, and words their errors the same way).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from pyvmm.records import MAX_PROBLEMS, did_you_mean, show

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
    return f", not {show(value)}" if isinstance(value, (bool, int, float, str, bytes)) else ""


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
