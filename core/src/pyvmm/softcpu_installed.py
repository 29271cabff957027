"""Whether the software CPU's engine (unicorn 2.x) is installed, asked without
importing it or :mod:`pyvmm.softcpu`.

Importing unicorn loads its shared library, and importing :mod:`pyvmm.softcpu`
builds the engine's tables: together more than the rest of ``pyvmm backends``,
which runs the availability probe of every backend on the software CPU.  Kept
out of the :mod:`pyvmm.softcpu` package, whose import does both.
"""

from __future__ import annotations

import importlib.util

from pyvmm.entry_points import distribution_version

#: How to get the engine.
INSTALL_HINT = "pip install 'pyvmm-core[softcpu]'"
#: The engine's distribution and import name.
ENGINE = "unicorn"


def softcpu_installed() -> tuple[bool, str]:
    """``(True, "")`` when unicorn 2.x is installed, else ``(False, why)``; never
    raises.  A library that is installed but cannot be loaded shows when the
    first software CPU is made (:class:`pyvmm.softcpu.SoftCpuUnavailable`)."""
    try:
        found = importlib.util.find_spec(ENGINE) is not None
    except (ImportError, ValueError) as exc:
        return False, f"the software CPU's engine cannot be found: {type(exc).__name__}: {exc}"
    if not found:
        return False, f"the software CPU needs {ENGINE} ({INSTALL_HINT}): it is not installed"
    version = distribution_version(ENGINE) or "?"
    if not version.startswith("2."):
        return False, f"the software CPU needs {ENGINE} 2.x, found {version} ({INSTALL_HINT})"
    return True, ""
