"""Flat binaries: the file's bytes at a given address, entered there in long mode."""

from __future__ import annotations

from pyvmm.boot import X86Mode
from pyvmm.machine.loaders.common import (
    FOUR_GIB,
    ImageError,
    Layout,
    LoadedKernel,
    Request,
    boot_spec,
    finish,
    reject_extras,
)


def load_flat(request: Request, load_address: int) -> LoadedKernel:
    path = request.path
    reject_extras(path, "flat binary", request.cmdline, request.initrd)
    if not 0 <= load_address < FOUR_GIB:
        # The boot page tables identity-map only the first 4 GiB.
        raise ImageError(path, f"load_address {load_address:#x} is not below 4 GiB")
    layout = Layout(path, request.ram)
    layout.write(load_address, request.data, "flat binary")
    tables = layout.boot_tables(long_mode=True, hi=FOUR_GIB)
    spec = boot_spec(path, load_address, X86Mode.LONG, tables, {})
    return finish(layout, request.memory, spec, "flat")
