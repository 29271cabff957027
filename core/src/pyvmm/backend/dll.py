"""The DLL seam: a Windows hypervisor API as a table of functions.

WHPX (``WinHvPlatform.dll``, ``WinHvEmulation.dll``) and HAXM's Windows device
are reached through exported functions, not ioctls.  A backend declares the
functions it calls as :class:`DllFunction` records; :class:`LoadedDll` resolves
them when the DLL loads -- a *required* export that is missing refuses the load
with its name, an *optional* one (exported only by newer Windows builds, e.g.
``WHvQueryGpaRangeDirtyBitmap``) is recorded as absent so the backend can narrow
its capabilities.  :class:`DllHost` adds the two error conventions of those APIs:

* ``HRESULT``: a negative value is a failure; it becomes a
  :class:`~pyvmm.errors.HypervisorError` in the HRESULT space, naming the function;
* ``BOOL`` + last error: ``FALSE`` is a failure, the reason is the thread's
  ``GetLastError()``; it becomes a HypervisorError in the WIN32 space.

(Microsoft documents both in "Error Handling in COM" and "GetLastError".)

:class:`DllSwitch` is the DLL counterpart of :class:`~pyvmm.backend.host.HostSwitch`:
one per backend, in its ``host.py``; tests and ``pyvmm run --model`` route new
objects to a model of the DLLs with ``HOST.use(model)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pyvmm.backend.seam import DllSeam
from pyvmm.backend.stand_in import standing_in
from pyvmm.errors import ErrorSpace, HypervisorError, VmStateError


@dataclass(frozen=True)
class DllFunction:
    """One export a backend calls: its ctypes signature and whether it must exist."""

    name: str
    restype: Any
    argtypes: tuple[Any, ...] = ()
    required: bool = True


@dataclass
class LoadedDll:
    """A loaded library with its declared functions resolved (implements :class:`DllSeam`).

    ``library`` is a ``ctypes`` library object (``ctypes.WinDLL(path)`` on Windows;
    any ``ctypes.CDLL`` works the same way, which is how this is tested on Linux).
    """

    library: Any
    functions: Iterable[DllFunction]
    get_last_error: Callable[[], int] = field(
        default=lambda: ctypes.get_last_error() if hasattr(ctypes, "get_last_error") else 0
    )
    _table: dict[str, Any] = field(init=False, default_factory=dict)
    missing_optional: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        missing_required: list[str] = []
        missing_optional: list[str] = []
        for spec in self.functions:
            try:
                fn = getattr(self.library, spec.name)
            except AttributeError:
                (missing_required if spec.required else missing_optional).append(spec.name)
                continue
            fn.restype = spec.restype
            fn.argtypes = list(spec.argtypes)
            self._table[spec.name] = fn
        if missing_required:
            name = getattr(self.library, "_name", repr(self.library))
            raise HypervisorError(
                f"load {name}",
                127,
                f"required export(s) missing: {', '.join(missing_required)}",
                space=ErrorSpace.WIN32,
            )
        self.missing_optional = tuple(missing_optional)

    def function(self, name: str) -> Any:
        return self._table[name]

    def has(self, name: str) -> bool:
        return name in self._table

    def last_error(self) -> int:
        return self.get_last_error()


def _last_error() -> int:
    # ctypes.get_last_error exists only on Windows (with use_last_error=True libraries).
    get = getattr(ctypes, "get_last_error", None)
    return int(get()) if get is not None else 0


class DllHost:
    """A DLL seam with the HRESULT and BOOL conventions turned into exceptions."""

    def __init__(self, seam: DllSeam) -> None:
        self.seam = seam

    def _fn(self, name: str) -> Any:
        try:
            return self.seam.function(name)
        except KeyError:
            raise VmStateError(f"{name} is not exported by this hypervisor DLL (an optional export)") from None

    def call_hresult(self, name: str, *args: Any, detail: str = "") -> int:
        """Call ``name``; a negative HRESULT raises a :class:`HypervisorError`."""
        result = int(self._fn(name)(*args))
        if result < 0:
            raise HypervisorError(name, result & 0xFFFFFFFF, detail, space=ErrorSpace.HRESULT)
        return result

    def call_bool(self, name: str, *args: Any, detail: str = "") -> None:
        """Call ``name``; ``FALSE`` raises a :class:`HypervisorError` with the
        thread's last error."""
        if not self._fn(name)(*args):
            raise HypervisorError(name, self.seam.last_error(), detail, space=ErrorSpace.WIN32)

    def has(self, name: str) -> bool:
        return self.seam.has(name)


class DllSwitch:
    """The one switch between a backend's real DLLs and a model of them.

    ``make_seam`` loads the DLLs on first use (never at import, so the plugin
    imports on every host); a VM keeps the host it was made with, so switching
    never reroutes a live object."""

    def __init__(self, backend: str, make_seam: Callable[[], DllSeam]) -> None:
        self.backend = backend
        self._make_seam = make_seam
        self._host: DllHost | None = None
        self._lock = threading.Lock()

    def current(self) -> DllHost:
        """The host new objects are created on (a host that cannot load the DLLs
        raises :class:`~pyvmm.errors.HypervisorError`)."""
        with self._lock:
            if self._host is None:
                self._host = DllHost(self._make_seam())
            return self._host

    @contextlib.contextmanager
    def use(self, seam: DllSeam) -> Iterator[DllHost]:
        """Route the objects created inside the block to ``seam`` (tests, models);
        while it lasts the backend counts as standing in (:mod:`pyvmm.backend.stand_in`)."""
        with self._lock:
            previous, self._host = self._host, DllHost(seam)
            installed = self._host
        try:
            with standing_in(self.backend):
                yield installed
        finally:
            with self._lock:
                self._host = previous
