"""The installed entry points of one group, read without :mod:`importlib.metadata`.

``importlib.metadata.entry_points()`` imports the email parser, zipfile, csv and
more, and reads every installed distribution's metadata: about 30 ms, more than
the rest of ``pyvmm backends``.  What discovery needs is less: the
``entry_points.txt`` of each distribution on ``sys.path`` that has one, and the
name and version of the few that declare the group.  This module reads exactly
that, following ``importlib.metadata``'s rules where they matter:

* distributions are the ``*.dist-info`` and ``*.egg-info`` directories of each
  ``sys.path`` entry, in path order ('' is the current directory);
* a distribution whose normalised name was met earlier on the path is shadowed
  and skipped (``importlib.metadata`` returns each name once, the first);
* ``entry_points.txt`` is INI-like: ``[group]`` sections of ``name = value``
  lines, ``#`` and ``;`` comments.

A ``sys.path`` entry that is a file (a zip archive, an egg) is something this
reader does not handle: then it asks ``importlib.metadata`` for the whole answer.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from pyvmm.lean_dataclass import lean_dataclass

__all__ = ["InstalledEntryPoint", "distribution_version", "entry_points"]

_SUFFIXES = (".dist-info", ".egg-info")
_VALUE = re.compile(r"^(?P<module>[\w.]+)\s*(?::\s*(?P<attr>[\w.]+)\s*)?(?:\[.*\]\s*)?$")


@lean_dataclass(frozen=True)
class InstalledEntryPoint:
    """One entry point of an installed distribution (the parts
    :mod:`pyvmm.plugins` reads of ``importlib.metadata.EntryPoint``)."""

    name: str
    value: str
    group: str
    distribution: str = "(unknown)"
    version: str = ""
    #: The ``sys.path`` entry the distribution's metadata lies in.
    location: str = ""

    def load(self) -> Any:
        """Import the module the value names and return the attribute it names.

        :raises ImportError: the value is malformed or the module cannot be imported.
        :raises AttributeError: the module lacks the attribute.
        """
        match = _VALUE.match(self.value.strip())
        if match is None:
            raise ImportError(f"entry point {self.name!r}: {self.value!r} is not 'module:attribute'")
        found: Any = importlib.import_module(match["module"])
        for part in (match["attr"] or "").split(".") if match["attr"] else ():
            found = getattr(found, part)
        return found


def _distributions(entries: list[str], only: str | None = None) -> Iterator[tuple[str, str, str]]:
    """``(path entry, metadata folder, metadata file name)`` of each distribution
    installed in ``entries``, the first of each project only (an earlier path
    entry shadows a later one, as for imports); ``only``: that normalised
    project alone."""
    seen: set[str] = set()
    for entry in entries:
        directory = entry or "."
        try:
            names = os.listdir(directory)
        except OSError:  # a missing or unreadable path entry holds no distribution
            continue
        for info in names:
            suffix = next((s for s in _SUFFIXES if info.lower().endswith(s)), None)
            if suffix is None:
                continue
            project = _normalised(info[: -len(suffix)].split("-", 1)[0])
            if project in seen or (only is not None and project != only):
                continue
            seen.add(project)
            yield entry, os.path.join(directory, info), "PKG-INFO" if suffix == ".egg-info" else "METADATA"


def entry_points(group: str, path: list[str] | None = None) -> list[InstalledEntryPoint]:
    """The entry points of ``group`` in the distributions installed on ``path``
    (default ``sys.path``), in path order.
    """
    entries = sys.path if path is None else path
    if any(entry and os.path.isfile(entry) for entry in entries):
        return _from_importlib(group)
    found: list[InstalledEntryPoint] = []
    for entry, folder, metadata_file in _distributions(entries):
        points = _group_of(os.path.join(folder, "entry_points.txt"), group)
        if not points:
            continue
        name, version = _name_and_version(folder, metadata_file)
        found += [
            InstalledEntryPoint(point, value, group, name or "(unknown)", version, entry or ".")
            for point, value in points
        ]
    return found


def distribution_version(project: str, path: list[str] | None = None) -> str | None:
    """The version of the installed distribution ``project`` (the first on
    ``path``, default ``sys.path``), or None when it is not installed: what an
    availability probe asks without importing the project.
    """
    entries = sys.path if path is None else path
    if any(entry and os.path.isfile(entry) for entry in entries):
        from importlib import metadata

        try:
            return metadata.version(project)
        except metadata.PackageNotFoundError:
            return None
    wanted = _normalised(project)
    for _, folder, metadata_file in _distributions(entries, only=wanted):
        return _name_and_version(folder, metadata_file)[1]
    return None


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _group_of(path: str, group: str) -> list[tuple[str, str]]:
    """The ``name = value`` pairs of section ``[group]`` of an entry_points.txt."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError):  # no such file, or not one pyvmm can read: no entry points
        return []
    pairs: list[tuple[str, str]] = []
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            inside = line[1:-1].strip() == group
            continue
        if inside and "=" in line:
            name, _, value = line.partition("=")
            pairs.append((name.strip(), value.strip()))
    return pairs


def _name_and_version(folder: str, metadata_file: str) -> tuple[str, str]:
    """``Name`` and ``Version`` from the header of a METADATA or PKG-INFO file."""
    name = version = ""
    try:
        with open(os.path.join(folder, metadata_file), encoding="utf-8") as file:
            for line in file:
                if not line.strip():
                    break  # the header ends at the first blank line
                key, _, value = line.partition(":")
                if key == "Name":
                    name = value.strip()
                elif key == "Version":
                    version = value.strip()
    except (OSError, UnicodeDecodeError):  # informational only: the entry point still loads
        pass
    return name, version


def _from_importlib(group: str) -> list[InstalledEntryPoint]:
    from importlib import metadata

    points = []
    for ep in metadata.entry_points(group=group):
        dist = ep.dist
        location = ""
        if dist is not None:
            try:
                location = str(dist.locate_file(""))
            except Exception:  # noqa: BLE001 - the location is informational only
                location = ""
        points.append(
            InstalledEntryPoint(
                ep.name,
                ep.value,
                group,
                (dist.metadata["Name"] if dist is not None else None) or "(unknown)",
                dist.version if dist is not None else "",
                location,
            )
        )
    return points
