"""The pyvmm config file's schema (``$PYVMM_CONFIG``, else
``~/.config/pyvmm/config.toml``; :mod:`pyvmm.policy` says where and what it means).

pydantic models, validated only when the file exists: :func:`pyvmm.policy.load_policy`
imports this module only then, so a command run without a config file never
imports pydantic.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pyvmm.errors import ConfigError
from pyvmm.manifest import NAME_PATTERN
from pyvmm.validation import validation_message

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

BackendName = Annotated[str, Field(pattern=NAME_PATTERN)]


class PluginsSection(BaseModel):
    """The ``[plugins]`` table of the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: tuple[BackendName, ...] | None = Field(
        default=None, description="only these backends load (absent: all that are not denied)"
    )
    deny: tuple[BackendName, ...] = Field(default=(), description="these backends never load")


class ConfigFile(BaseModel):
    """The pyvmm config file.  Tables other than ``[plugins]`` belong to other
    parts of pyvmm and are passed over here."""

    model_config = ConfigDict(extra="allow", frozen=True)

    plugins: PluginsSection = Field(default_factory=PluginsSection)


def parse_config(text: str, path: Path | str) -> ConfigFile:
    """Parse and validate the text of the config file at ``path``.

    :raises ConfigError: not TOML, or an invalid ``[plugins]`` table (naming ``path``).
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_message(exc)}") from exc
