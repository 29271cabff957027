"""Loading unicorn on first use, and the C entry points its Python binding lacks.

``import pyvmm.softcpu`` must not import unicorn: it is an optional extra, and a
backend's availability probe has to be able to ask "is it installed?" without
paying for (or failing on) the import.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from pyvmm.errors import PyvmmError
from pyvmm.softcpu_installed import INSTALL_HINT

#: A PC no guest can reach: non-canonical on x86_64 and outside every aarch64
#: VA range.  unicorn insists on an end address; the engine enables an empty
#: exit list, so it is ignored (and never translated).
UNREACHABLE = 1 << 63
#: Instruction budget of a normal run.  Any count at all makes unicorn check for
#: a stop request before every instruction (its own counting hook), which is what
#: makes a stop from an I/O hook land exactly after the I/O instruction.  It must
#: never be 0: dropping the counting hook again flushes every translation.
RUN_BUDGET = 1 << 62


class SoftCpuUnavailable(PyvmmError, ImportError):
    """unicorn (the software CPU) is not installed or cannot be loaded."""


@functools.cache
def unicorn() -> ModuleType:
    """The ``unicorn`` package, imported now.

    :raises SoftCpuUnavailable: it is missing or its shared library fails to load.
    """
    try:
        return importlib.import_module("unicorn")
    except ImportError as exc:
        raise SoftCpuUnavailable(f"the software CPU needs unicorn ({INSTALL_HINT}): {exc}") from exc


def available() -> tuple[bool, str]:
    """Whether the engine can run here, and if not why -- never raises (for probes)."""
    try:
        module = unicorn()
    except SoftCpuUnavailable as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001 - a broken install must not take a probe down
        return False, f"unicorn failed to load: {type(exc).__name__}: {exc}"
    version = getattr(module, "__version__", "?")
    if not str(version).startswith("2."):
        return False, f"the software CPU needs unicorn 2.x, found {version} ({INSTALL_HINT})"
    return True, ""


def _library() -> Any:
    # The binding keeps its ctypes handle here; vmem_translate (unicorn >= 2.1)
    # has no Python wrapper in 2.1.x.
    binding = importlib.import_module("unicorn.unicorn_py3.unicorn")
    return binding.uclib


@functools.cache
def _translate_fn() -> Any:
    lib = _library()
    fn = getattr(lib, "uc_vmem_translate", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64))
    return fn


def vmem_translate(engine: Any, address: int, prot: int) -> int | None:
    """Guest-virtual to guest-physical through the emulated MMU, or None where the
    page is not mapped for ``prot`` (or this unicorn cannot translate)."""
    fn = _translate_fn()
    if fn is None:
        return None
    out = ctypes.c_uint64()
    handle = engine._uch  # the binding's engine handle; no public accessor exists
    if fn(handle, address, prot, ctypes.byref(out)) != 0:
        return None
    return int(out.value)


_MASK64 = (1 << 64) - 1


class RegisterFile:
    """Reads and writes of integer registers straight through the C API: the
    binding's generic path costs ~3 µs a call, and an exit needs a dozen."""

    __slots__ = ("_buffer", "_error", "_handle", "_read", "_ref", "_write")

    def __init__(self, engine: Any) -> None:
        lib = _library()
        self._handle = engine._uch
        # The binding declared these prototypes: (uc_engine, int regid, void *value).
        self._read = lib.uc_reg_read
        self._write = lib.uc_reg_write
        self._buffer = ctypes.c_uint64()
        self._ref = ctypes.byref(self._buffer)
        self._error: type[Exception] = unicorn().UcError

    def read(self, reg: int) -> int:
        self._buffer.value = 0  # narrower registers fill only the low bytes
        status = self._read(self._handle, reg, self._ref)
        if status:
            raise self._error(status)
        return int(self._buffer.value)

    def write(self, reg: int, value: int) -> None:
        self._buffer.value = value & _MASK64
        status = self._write(self._handle, reg, self._ref)
        if status:
            raise self._error(status)


#: ``int callback(uc_engine *, void *user_data)``: unicorn's prototype for the
#: x86 instruction hooks that can skip their instruction (CPUID, RDTSC, RDTSCP).
_INSN_SKIP_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class InstructionHook:
    """An x86 ``UC_HOOK_INSN`` hook added through the C API.  The binding (2.1)
    accepts only IN, OUT, SYSCALL, SYSENTER and CPUID there, while the library
    also calls hooks on RDTSC and RDTSCP; this object keeps the C callback
    alive as long as the engine may call it."""

    __slots__ = ("_c_callback", "handle")

    def __init__(self, engine: Any, instruction: int, callback: Callable[[], bool]) -> None:
        def trampoline(_engine: int | None, _data: int | None) -> int:
            # A Python exception cannot cross the C frames: ctypes would print
            # it and return 0 (the instruction runs unhooked), so callbacks
            # are written not to raise.
            return 1 if callback() else 0

        self._c_callback = _INSN_SKIP_CALLBACK(trampoline)
        handle = ctypes.c_size_t()
        lib = _library()
        status = lib.uc_hook_add(
            engine._uch,
            ctypes.byref(handle),
            unicorn().UC_HOOK_INSN,
            ctypes.cast(self._c_callback, ctypes.c_void_p),
            None,
            ctypes.c_uint64(1),  # begin > end: the whole address space
            ctypes.c_uint64(0),
            ctypes.c_int(instruction),
        )
        if status:
            raise unicorn().UcError(status)
        self.handle = int(handle.value)
