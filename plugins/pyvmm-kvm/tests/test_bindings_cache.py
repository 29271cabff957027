"""KVM's declarations load from the cffi cache with exactly the layouts an
in-process parse gives (pyvmm.backend.ffi_cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyvmm.backend.ffi_cache import ENV_FFI_CACHE, declared_ffi
from pyvmm_kvm import bindings


def _layouts(ffi: Any) -> dict[str, tuple[int, tuple[tuple[str, int], ...]]]:
    _, structs, unions = ffi.list_types()
    layouts = {}
    for kind, names in (("struct", structs), ("union", unions)):
        for name in names:
            ctype = ffi.typeof(f"{kind} {name}")
            fields = tuple((field, info.offset) for field, info in (ctype.fields or ()))
            layouts[f"{kind} {name}"] = (ffi.sizeof(ctype), fields)
    return layouts


@pytest.mark.parametrize(
    "cdef",
    [bindings._X86_64_CDEF + bindings._GENERIC_CDEF, bindings._AARCH64_CDEF + bindings._GENERIC_CDEF],
    ids=["x86_64", "aarch64"],
)
def test_cached_layouts_equal_parsed_layouts(tmp_path: Path, cdef: str) -> None:
    parsed = declared_ffi(cdef, {ENV_FFI_CACHE: "off"})
    declared_ffi(cdef, {ENV_FFI_CACHE: str(tmp_path)})  # fills the cache
    cached = declared_ffi(cdef, {ENV_FFI_CACHE: str(tmp_path)})
    assert type(cached).__module__ == "_cffi_backend"
    expected = _layouts(parsed)
    assert len(expected) > 25  # every struct and union the bindings declare
    assert _layouts(cached) == expected
