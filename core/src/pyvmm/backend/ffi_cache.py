"""cffi declarations parsed once per machine, not once per process.

A backend's bindings declare their C structs with cffi in ABI mode.  Parsing
those declarations (pycparser, in pure Python) costs 30-40 ms for KVM's, on
every start-up of every command that imports the backend -- more than the whole
interpreter takes to start.  cffi's *out-of-line* ABI mode does the parsing
ahead of time and emits a small Python module holding the parsed types, which
loads in about a millisecond.

:func:`declared_ffi` does exactly that, the way Python caches bytecode: the
first process to need a set of declarations parses them and writes cffi's
out-of-line module to a cache directory; every later one loads that module.
The module's compiled code is kept next to it (``ffi_<key>.code``, marshalled
and stamped with the source's mtime and size, as a ``.pyc`` is), so that later
processes run it without compiling it again.

Why a cache filled at first use rather than a module generated at build time:
the backends are pure-Python distributions whose declarations are ordinary
Python strings next to the constants that use them.  Generating at build time
would need a build hook in every backend (setuptools' editable installs place
generated files differently from wheels), pyvmm-core importable inside an
isolated build environment, and the declarations moved out of the bindings
module so the hook could read them -- all of it for a step whose output depends
only on the declaration text.  Keyed by that text (and the cffi and Python
versions), the cache can never be stale, needs no build step, and works the same
in a wheel, an editable install and a source checkout.

The fallback is cffi's in-process parse, exactly as before: it is used when the
cache is turned off (``PYVMM_FFI_CACHE=off``), cannot be written (read-only
home) or holds a file that does not load; a broken cache file costs one parse
and is rewritten, never an error.  ``PYVMM_FFI_CACHE=DIR`` chooses the directory
(default ``$XDG_CACHE_HOME/pyvmm/cffi``, else ``~/.cache/pyvmm/cffi``).

What is loaded from the cache is Python code, run with the user's rights, so it
is trusted exactly as far as the user's own ``__pycache__``: a file is used only
when the current user owns it and nobody else may write to it or its directory.
"""

from __future__ import annotations

import importlib
import os
import stat
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import _cffi_backend  # type: ignore[import-untyped]  # cffi's runtime, shipped without stubs

if TYPE_CHECKING:
    from pathlib import Path

    from _typeshed import StrPath

ENV_FFI_CACHE = "PYVMM_FFI_CACHE"
#: The value of :data:`ENV_FFI_CACHE` that turns the cache off.
CACHE_OFF = "off"

#: Bumped when the layout of the cache files changes.
_FORMAT = "1"


def cache_directory(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where out-of-line modules are kept, or None when the cache is off."""
    directory = _cache_root(environ)
    if directory is None:
        return None
    from pathlib import Path

    return Path(directory)


def _cache_root(environ: Mapping[str, str] | None) -> str | None:
    """:func:`cache_directory` as a string: every start-up of a backend reads it,
    and pathlib costs ~5 ms to import for a file name."""
    env = os.environ if environ is None else environ
    chosen = env.get(ENV_FFI_CACHE, "").strip()
    if chosen.lower() == CACHE_OFF:
        return None
    if chosen:
        return chosen
    base = env.get("XDG_CACHE_HOME", "").strip()
    root = base if base else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pyvmm", "cffi")


def declaration_key(cdef: str, packed: bool = False) -> str:
    """The cache key of ``cdef``: its text (and packing), the cffi runtime and the
    interpreter, so a different cffi or Python never loads another's file."""
    digest = _sha256()
    layout = "packed" if packed else "natural"
    for part in (_FORMAT, _cffi_backend.__version__, sys.implementation.cache_tag or "", sys.platform, layout, cdef):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


def _sha256() -> _Hasher:
    """A SHA-256 hasher, from CPython's own sha256 module where it has one.

    ``import hashlib`` loads OpenSSL (``_hashlib``), several milliseconds of
    every start-up that imports a backend, for one digest of a few kilobytes;
    CPython's built-in module gives the same digest.  hashlib where a build
    lacks it.
    """
    for name in ("_sha2", "_sha256"):  # Python 3.12 and later; 3.10 and 3.11
        try:
            hasher: _Hasher = importlib.import_module(name).sha256()
            return hasher
        except ImportError:
            continue
    import hashlib

    return hashlib.sha256()


def declared_ffi(cdef: str, environ: Mapping[str, str] | None = None, *, packed: bool = False) -> Any:
    """An FFI object holding ``cdef``'s declarations (``packed``: every struct
    laid out without padding, cffi's ``cdef(..., packed=True)``).

    From the cache when it holds them, else parsed in process (and written to
    the cache for the next process).  Either way the object answers ``new``,
    ``cast``, ``sizeof``, ``offsetof``, ``buffer``, ``from_buffer``, ``dlopen``
    and the rest of cffi's runtime API identically; it does not take further
    ``cdef`` calls.

    :raises cffi.CDefError: ``cdef`` is not valid C declarations (from the parse).
    """
    directory = _cache_root(environ)
    if directory is None:
        return _parsed(cdef, packed)
    key = declaration_key(cdef, packed)
    path = os.path.join(directory, f"ffi_{key}.py")
    loaded = _load(path)
    if loaded is not None:
        return loaded
    ffi = _parsed(cdef, packed)
    _store(ffi, key, directory, path)
    return ffi


def _parsed(cdef: str, packed: bool = False) -> Any:
    """The in-process parse: the fallback, and what fills the cache."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(cdef, packed=packed)
    return ffi


def _private_to_us(path: StrPath) -> os.stat_result | None:
    """``path``'s status when it is ours and nobody else can write to it, else None."""
    info = os.stat(path)
    getuid = getattr(os, "getuid", None)
    if getuid is not None and info.st_uid != getuid():
        return None
    return None if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) else info


def _load(path: StrPath) -> Any:
    """The FFI object in the cache file ``path``; None when there is none, it is
    not private to this user, or it does not load (it is then rewritten)."""
    try:
        if _private_to_us(os.path.dirname(path)) is None:
            return None
        info = _private_to_us(path)
        if info is None:
            return None
        code = _compiled(path, info)
        namespace: dict[str, Any] = {}
        exec(code, namespace)
    except Exception:  # noqa: BLE001 - any broken cache file means "parse instead"
        return None
    ffi = namespace.get("ffi")
    return ffi if isinstance(ffi, _cffi_backend.FFI) else None


#: Starts a compiled cache file; followed by the source's mtime and size.
_CODE_MAGIC = b"pyvmm-ffi-code-1"


def _code_stamp(source: os.stat_result) -> bytes:
    return _CODE_MAGIC + source.st_mtime_ns.to_bytes(8, "little") + source.st_size.to_bytes(8, "little")


def _compiled(path: StrPath, source: os.stat_result) -> Any:
    """The code object of the cache file ``path``, from its compiled twin
    (``.code``, marshalled) when that was made from this very file, as Python's
    own ``.pyc`` files are; else compiled now and the twin (re)written.

    Compiling the out-of-line module's source costs more than running it; the
    file name's key already names the interpreter, and the stamp (the source's
    mtime and size, as in a ``.pyc``) ties the twin to the source it came from.
    """
    import marshal  # built in: nothing to load

    twin = os.path.splitext(path)[0] + ".code"
    stamp = _code_stamp(source)
    try:
        if _private_to_us(twin) is not None:
            data = _read(twin)
            if data.startswith(stamp):
                return marshal.loads(data[len(stamp) :])
    except (OSError, ValueError, EOFError, TypeError):
        pass  # no twin, or a broken one: compile, and write it again
    code = compile(_read(path), os.fspath(path), "exec")
    _write_private(twin, stamp + marshal.dumps(code))
    return code


def _read(path: StrPath) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _write_private(path: StrPath, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) through a temporary file renamed
    over it; failing to is not an error (the next process compiles again)."""
    folder, name = os.path.split(os.fspath(path))
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except OSError:
        pass
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _store(parsed: Any, key: str, directory: StrPath, path: StrPath) -> None:
    """Write the out-of-line module of the ``parsed`` declarations; failing to
    is not an error (the next process parses again)."""
    # emit_python_code() is make_py_source() with a "generating ..." line on
    # stdout, which would land in the middle of a command's output.
    from cffi.recompiler import make_py_source

    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Written under a temporary name and renamed, so that a process loading
        # the file never sees half of it.
        import tempfile  # here: only writing the cache needs it, not every start

        handle, temporary = tempfile.mkstemp(prefix=".ffi_", suffix=".tmp", dir=directory)
        os.close(handle)
        try:
            make_py_source(parsed, f"_pyvmm_ffi_{key}", temporary, verbose=False)
            os.chmod(temporary, 0o600)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except Exception:  # noqa: BLE001 - a cache that cannot be written is only slower
        return
