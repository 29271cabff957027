"""Which exit path a KVM VM takes: the compiled one, or the pure-Python one.

``pyvmm_kvm._fast_exits`` (cffi API mode, ``fast_exits.c``) is built at install
where a C compiler exists (``setup.py``); it runs ``KVM_RUN`` and answers the
served registers (:mod:`pyvmm.served_io`) without returning to Python.  Where it
was not built, or ``PYVMM_KVM_PURE_EXITS=1`` asks for the pure path (tests run
both), :mod:`pyvmm_kvm.served` answers the same registers in Python.  A VM on a
driver model (any seam but libc's) always takes the pure path: the compiled
loop makes the real system call.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from pyvmm.backend import DeviceHost, LibcDeviceSeam

#: Set to 1 to take the pure-Python exit path even where the module was built.
ENV_PURE_EXITS = "PYVMM_KVM_PURE_EXITS"

_MODULE = "pyvmm_kvm._fast_exits"
_NOT_YET: Any = object()


def compiled_module() -> Any | None:
    """The compiled module (``ffi``, ``lib``), or None when it was not built or
    :data:`ENV_PURE_EXITS` turns it off."""
    if os.environ.get(ENV_PURE_EXITS, "").strip() not in ("", "0"):
        return None
    # sys.modules first: every VM asks, and importlib costs µs even for a module
    # already imported.  (None there means "not importable", as import says.)
    module = sys.modules.get(_MODULE, _NOT_YET)
    if module is not _NOT_YET:
        return module
    try:
        return importlib.import_module(_MODULE)  # built at install, where it could be
    except ImportError:
        return None


def compiled_module_for(host: DeviceHost) -> Any | None:
    """The compiled module for a VM on ``host``: only on the real system calls."""
    if not isinstance(host.seam, LibcDeviceSeam):
        return None
    return compiled_module()
