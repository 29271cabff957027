"""Plugin policy: which installed backends pyvmm may load.

An administrator (or a CI job, or a vendor shipping a private backend) can
restrict the backends that discovery loads, without uninstalling anything:

* environment: ``PYVMM_BACKENDS_ALLOW`` and ``PYVMM_BACKENDS_DENY``, each a
  comma-separated list of names (``PYVMM_BACKENDS_ALLOW=kvm,acme``);
* a config file: ``$PYVMM_CONFIG`` if set, else
  ``$XDG_CONFIG_HOME/pyvmm/config.toml`` (``~/.config/pyvmm/config.toml``)::

      [plugins]
      allow = ["kvm", "acme"]
      deny = ["unicorn"]

Rules:

* A name on a deny list is never loaded; deny wins over allow.
* If an allow list exists, only the names on it are loaded.
* An environment variable replaces the file's list of the same kind (so
  ``PYVMM_BACKENDS_ALLOW=`` set to empty lifts the file's allow list); the two
  kinds combine.
* A name matches a plugin by its entry-point name (the name in
  ``[project.entry-points.pyvmm]``) *and* by the backend name its manifest
  declares; a plugin loads only if both names pass (:meth:`PluginPolicy.denial`
  is asked for each).  The entry-point name is decided *before* the plugin is
  imported, so a plugin denied by it never runs any code.  The backend name is
  known only from the manifest: a plugin whose entry point is ``aaa`` but whose
  manifest says ``kvm`` is imported and asked for its manifest, then refused as
  denied before anything else of it runs (its availability probe and its other
  hooks never do) -- so ``PYVMM_BACKENDS_DENY=kvm`` stops every plugin that
  calls itself ``kvm``, and an allow list of ``kvm`` admits only a plugin that
  is ``kvm`` under both names.

A denied plugin is not a failure: ``pyvmm backends`` lists it as denied, with
the rule and where it came from.  A config file that is not valid TOML, or
whose ``[plugins]`` table has other keys or malformed names, raises
:class:`~pyvmm.errors.ConfigError` naming the file -- a policy that cannot be
read must not silently allow everything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pyvmm.errors import ConfigError
from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.manifest import NAME_PATTERN as MANIFEST_NAME_PATTERN

if TYPE_CHECKING:
    from pathlib import Path

    from pyvmm.config_file import ConfigFile

ENV_ALLOW = "PYVMM_BACKENDS_ALLOW"
ENV_DENY = "PYVMM_BACKENDS_DENY"
ENV_CONFIG = "PYVMM_CONFIG"

#: What a backend (entry-point) name looks like; the manifest's name rule.
NAME_PATTERN = MANIFEST_NAME_PATTERN


@lean_dataclass(frozen=True)
class PluginPolicy:
    """The merged allow/deny lists, and where each came from."""

    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()
    allow_source: str = ""
    deny_source: str = ""

    @property
    def active(self) -> bool:
        return self.allow is not None or bool(self.deny)

    def denial(self, name: str) -> str | None:
        """Why the plugin of entry-point or backend name ``name`` may not load,
        or None if it may.  Discovery asks once per name a plugin has."""
        if name in self.deny:
            return f"denied by {self.deny_source}"
        if self.allow is not None and name not in self.allow:
            allowed = ", ".join(sorted(self.allow)) or "nothing"
            return f"not on the allow list of {self.allow_source} (allowed: {allowed})"
        return None

    def describe(self) -> dict[str, Any]:
        """The policy as ``pyvmm backends --json`` shows it."""
        return {
            "allow": sorted(self.allow) if self.allow is not None else None,
            "allow_source": self.allow_source,
            "deny": sorted(self.deny),
            "deny_source": self.deny_source,
        }


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the config file is looked for (it need not exist)."""
    from pathlib import Path

    return Path(_config_file(environ))


def _config_file(environ: Mapping[str, str] | None) -> str:
    """:func:`config_path` as a string: what every command reads, without
    pathlib (~5 ms of start-up, for one file name)."""
    env = os.environ if environ is None else environ
    explicit = env.get(ENV_CONFIG)
    if explicit:
        return os.path.normpath(os.path.expanduser(explicit))
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "~"), ".config")
    return os.path.normpath(os.path.join(os.path.expanduser(base), "pyvmm", "config.toml"))


def read_text(path: Path | str) -> str | None:
    """The config file's text, or None when there is none.

    :raises ConfigError: it exists but cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the pyvmm config file: {exc}") from exc


def read_config(path: Path) -> ConfigFile:
    """Parse and validate a config file; a missing file is an empty config.

    :raises ConfigError: unreadable, not TOML, or an invalid ``[plugins]`` table.
    """
    from pyvmm.config_file import ConfigFile, parse_config

    text = read_text(path)
    return ConfigFile() if text is None else parse_config(text, path)


def _env_names(variable: str, value: str) -> frozenset[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    for name in names:
        if not re.fullmatch(NAME_PATTERN, name):
            raise ConfigError(f"{variable}: {name!r} is not a backend name (lower-case letters, digits, - and _)")
    return frozenset(names)


def load_policy(environ: Mapping[str, str] | None = None) -> PluginPolicy:
    """The policy in force: the config file's lists, each replaced by its
    environment variable where that is set.

    :raises ConfigError: the config file or a variable is malformed.
    """
    env = os.environ if environ is None else environ
    path = _config_file(env)
    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()
    # Without a config file (the common case) nothing is validated, so pydantic
    # is not imported (pyvmm.config_file).
    text = read_text(path)
    if text is not None:
        from pyvmm.config_file import parse_config

        section = parse_config(text, path).plugins
        allow = frozenset(section.allow) if section.allow is not None else None
        deny = frozenset(section.deny)
    allow_source = f"{path} [plugins] allow" if allow is not None else ""
    deny_source = f"{path} [plugins] deny" if deny else ""
    if ENV_ALLOW in env:
        names = _env_names(ENV_ALLOW, env[ENV_ALLOW])
        allow, allow_source = (names, ENV_ALLOW) if names else (None, "")
    if ENV_DENY in env:
        deny, deny_source = _env_names(ENV_DENY, env[ENV_DENY]), ENV_DENY
    return PluginPolicy(allow=allow, deny=deny, allow_source=allow_source, deny_source=deny_source)
