"""cffi builder of ``pyvmm_kvm._fast_exits`` (API mode), run by ``setup.py``.

Standalone on purpose: it runs in the isolated build environment, where neither
pyvmm nor pyvmm_kvm is importable.  The C source is ``fast_exits.c`` beside it.
"""

from __future__ import annotations

from pathlib import Path

import cffi

CDEF = """
struct fx_range {
    uint64_t base;
    uint64_t size;
    uint64_t value;
    uint8_t *latch;
    uint8_t space;
    uint8_t kind;
};
struct fx_table {
    uint32_t count;
    struct fx_range ranges[32];
};
int fx_run(int fd, void *page, struct fx_table *table, uint64_t *served);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pyvmm_kvm._fast_exits",
    (Path(__file__).resolve().parent / "fast_exits.c").read_text(),
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
