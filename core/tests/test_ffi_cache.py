"""The cffi declaration cache (pyvmm.backend.ffi_cache): parsed once, loaded after,
never stale, and never worse than parsing when the cache is off or broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyvmm.backend import ffi_cache
from pyvmm.backend.ffi_cache import ENV_FFI_CACHE, cache_directory, declaration_key, declared_ffi

CDEF = """
struct probe_pair { uint32_t a; uint64_t b; };
struct probe_outer { uint8_t tag; union { uint16_t half; uint32_t word; }; struct probe_pair pair[3]; };
"""


def _env(directory: Path) -> dict[str, str]:
    return {ENV_FFI_CACHE: str(directory)}


def _layout(ffi: Any) -> tuple[int, int, int, int]:
    return (
        ffi.sizeof("struct probe_pair"),
        ffi.sizeof("struct probe_outer"),
        ffi.offsetof("struct probe_outer", "word"),
        ffi.offsetof("struct probe_outer", "pair"),
    )


def _cache_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("ffi_*.py"))


def test_first_use_parses_and_writes_the_out_of_line_module(tmp_path: Path) -> None:
    ffi = declared_ffi(CDEF, _env(tmp_path))
    assert _layout(ffi) == (16, 56, 4, 8)
    (written,) = _cache_files(tmp_path)
    assert written.name == f"ffi_{declaration_key(CDEF)}.py"
    assert written.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".ffi_*")), "the temporary file is renamed, not left behind"


def test_later_use_loads_the_cache_without_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = declared_ffi(CDEF, _env(tmp_path))

    def no_parse(cdef: str) -> Any:
        raise AssertionError("parsed although the cache holds the declarations")

    monkeypatch.setattr(ffi_cache, "_parsed", no_parse)
    loaded = declared_ffi(CDEF, _env(tmp_path))
    assert type(loaded).__module__ == "_cffi_backend"
    assert _layout(loaded) == _layout(parsed)
    value = loaded.new("struct probe_outer *", {"tag": 7, "word": 0x01020304})
    assert (value.tag, value.half) == (7, 0x0304)


def test_a_new_process_takes_the_cached_declarations(tmp_path: Path) -> None:
    declared_ffi(CDEF, _env(tmp_path))
    code = (
        "import json, sys; from pyvmm.backend.ffi_cache import declared_ffi; "
        f"ffi = declared_ffi({CDEF!r}); "
        "print(json.dumps([type(ffi).__module__, 'pycparser' in sys.modules, ffi.sizeof('struct probe_outer')]))"
    )
    env = {**os.environ, ENV_FFI_CACHE: str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["_cffi_backend", False, 56]


def test_changed_declarations_get_their_own_entry(tmp_path: Path) -> None:
    declared_ffi(CDEF, _env(tmp_path))
    wider = CDEF.replace("uint32_t a;", "uint64_t a;")
    assert declaration_key(wider) != declaration_key(CDEF)
    assert declared_ffi(wider, _env(tmp_path)).sizeof("struct probe_pair") == 16
    assert declared_ffi(wider, _env(tmp_path)).offsetof("struct probe_pair", "b") == 8
    assert len(_cache_files(tmp_path)) == 2


def test_packed_declarations_keep_their_packing_through_the_cache(tmp_path: Path) -> None:
    """HAXM's structs are PACKED: a packed cdef gets an entry of its own, and the
    layout loaded from the cache is the packed one, not the natural one."""
    natural = declared_ffi(CDEF, _env(tmp_path))
    assert declaration_key(CDEF, packed=True) != declaration_key(CDEF)
    for _ in range(2):  # parsed and stored, then loaded from the cache
        packed = declared_ffi(CDEF, _env(tmp_path), packed=True)
        assert (packed.sizeof("struct probe_pair"), packed.offsetof("struct probe_pair", "b")) == (12, 4)
    assert (natural.sizeof("struct probe_pair"), natural.offsetof("struct probe_pair", "b")) == (16, 8)
    assert len(_cache_files(tmp_path)) == 2


@pytest.mark.parametrize(
    "content",
    [b"", b"ffi = None\n", b"raise SystemError('boom')\n", b"this is not python(", b"\xff\xfe\x00"],
    ids=["empty", "no-ffi", "raises", "syntax", "binary"],
)
def test_a_broken_cache_file_is_parsed_again_and_repaired(tmp_path: Path, content: bytes) -> None:
    declared_ffi(CDEF, _env(tmp_path))
    (path,) = _cache_files(tmp_path)
    path.write_bytes(content)
    assert _layout(declared_ffi(CDEF, _env(tmp_path))) == (16, 56, 4, 8)
    assert path.read_bytes() != content
    assert type(declared_ffi(CDEF, _env(tmp_path))).__module__ == "_cffi_backend"


def test_a_cache_file_others_may_write_is_not_loaded(tmp_path: Path) -> None:
    # A loadable module with other layouts, planted under the key of CDEF.
    planted = tmp_path / "planted"
    declared_ffi(CDEF.replace("uint64_t b;", "uint8_t b;"), _env(planted))
    (source,) = _cache_files(planted)
    path = tmp_path / f"ffi_{declaration_key(CDEF)}.py"
    path.write_bytes(source.read_bytes())
    path.chmod(0o600)
    assert declared_ffi(CDEF, _env(tmp_path)).sizeof("struct probe_pair") == 8, "a private file is trusted"
    path.write_bytes(source.read_bytes())
    path.chmod(0o620)
    assert _layout(declared_ffi(CDEF, _env(tmp_path))) == (16, 56, 4, 8)


def test_off_parses_in_process_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ffi = declared_ffi(CDEF, {ENV_FFI_CACHE: "off", "XDG_CACHE_HOME": str(tmp_path)})
    assert type(ffi).__module__ == "cffi.api"
    assert _layout(ffi) == (16, 56, 4, 8)
    assert not any(tmp_path.iterdir())


def test_an_unwritable_cache_directory_falls_back_to_parsing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ffi = declared_ffi(CDEF, _env(blocker / "cffi"))
    assert _layout(ffi) == (16, 56, 4, 8)


def test_bad_declarations_still_raise_cffi_errors(tmp_path: Path) -> None:
    import cffi

    with pytest.raises(cffi.CDefError):
        declared_ffi("struct broken { no_such_type_t a; };", _env(tmp_path))
    assert not _cache_files(tmp_path)


def test_cache_directory_choice(tmp_path: Path) -> None:
    assert cache_directory({ENV_FFI_CACHE: "OFF"}) is None
    assert cache_directory({ENV_FFI_CACHE: str(tmp_path)}) == tmp_path
    assert cache_directory({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "pyvmm" / "cffi"
    assert cache_directory({}) == Path.home() / ".cache" / "pyvmm" / "cffi"


def test_later_use_runs_the_compiled_twin_without_compiling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    declared_ffi(CDEF, _env(tmp_path))  # writes the module
    declared_ffi(CDEF, _env(tmp_path))  # compiles it once, writes its twin
    (twin,) = tmp_path.glob("ffi_*.code")
    assert twin.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".ffi_*")), "the temporary file is renamed, not left behind"

    def no_compile(*args: Any) -> Any:
        raise AssertionError("compiled although the twin holds the code")

    monkeypatch.setattr(ffi_cache, "compile", no_compile, raising=False)
    assert _layout(declared_ffi(CDEF, _env(tmp_path))) == (16, 56, 4, 8)


def test_a_twin_of_another_source_or_writable_by_others_is_not_run(tmp_path: Path) -> None:
    declared_ffi(CDEF, _env(tmp_path))
    declared_ffi(CDEF, _env(tmp_path))
    (twin,) = tmp_path.glob("ffi_*.code")
    stale = twin.read_bytes()
    planted = tmp_path / "planted"
    declared_ffi(CDEF.replace("uint64_t b;", "uint8_t b;"), _env(planted))
    (other,) = _cache_files(planted)
    (path,) = _cache_files(tmp_path)
    (tmp_path / "original.py").write_bytes(path.read_bytes())
    path.write_bytes(other.read_bytes())  # the source changed: the twin is stale
    assert declared_ffi(CDEF, _env(tmp_path)).sizeof("struct probe_pair") == 8
    assert twin.read_bytes() != stale, "the twin is rewritten from the new source"
    # A twin stamped for the current source but holding CDEF's code: trusted
    # while private, never run once others may write to it.
    import marshal

    original = compile((planted.parent / "original.py").read_bytes(), "original", "exec")
    twin.write_bytes(ffi_cache._code_stamp(path.stat()) + marshal.dumps(original))
    twin.chmod(0o600)
    assert declared_ffi(CDEF, _env(tmp_path)).sizeof("struct probe_pair") == 16, "a private twin is trusted"
    twin.write_bytes(ffi_cache._code_stamp(path.stat()) + marshal.dumps(original))
    twin.chmod(0o620)
    assert declared_ffi(CDEF, _env(tmp_path)).sizeof("struct probe_pair") == 8
