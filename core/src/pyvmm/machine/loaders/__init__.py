"""Kernel and image loaders: put a kernel (and its command line and initrd) into guest
RAM and say how to start it.

:func:`load_kernel` recognises, in this order:

1. Multiboot v1 (a valid header in the first 8 KiB): ELF or a.out-kludge images,
   such as kvm-unit-tests' x86 ``.flat`` files -- 32-bit protected mode, EAX =
   0x2BADB002, EBX = the Multiboot information structure;
2. Linux bzImage ("HdrS" at 0x202) -- the 64-bit boot protocol (long mode, RSI =
   zero page) or, for kernels without it, the 32-bit one (protected mode, RSI);
3. ELF with a PVH note (XEN_ELFNOTE_PHYS32_ENTRY) -- 32-bit protected mode, EBX =
   ``hvm_start_info``;
4. plain ELF -- long mode for ELF64, protected mode for ELF32, no arguments;
5. a flat binary, only when ``load_address`` is given -- long mode at that address.

:func:`load_arm64_kernel` (:mod:`pyvmm.machine.loaders.arm64`) is the aarch64
counterpart: a Linux arm64 ``Image``, or a flat binary at ``load_address``, with
an initrd and the device tree the board builds.

Every loader validates everything (file, headers, sizes, placement in RAM, command
line, initrd) before it writes a byte; a problem raises :class:`ImageError`.

Kernel and initrd files are read with :func:`pyvmm.config.read_input_file`: a
regular file of at most ``ram_size`` bytes, or an ``ImageError`` without reading
(a FIFO is never waited on, ``/dev/zero`` never read).  Laying out an image is
O(n log n) in its number of segments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# ImageError and LoadedKernel are the common module's; the x86 loaders are
# imported by load_kernel when a kernel is loaded: a run of the bundled demo,
# which catches ImageError, needs none of them (start-up, issue 19).
from pyvmm.machine.loaders.common import ImageError, LoadedKernel, RamMap, Request, read_file

if TYPE_CHECKING:
    from pathlib import Path

    from pyvmm.machine.loaders.arm64 import load_arm64_kernel
    from pyvmm.memory import GuestMemory

__all__ = ["ImageError", "LoadedKernel", "load_arm64_kernel", "load_kernel"]


def __getattr__(name: str) -> object:
    if name == "load_arm64_kernel":
        from pyvmm.machine.loaders.arm64 import load_arm64_kernel

        return load_arm64_kernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_kernel(
    path: Path,
    memory: GuestMemory,
    *,
    cmdline: str = "",
    initrd: Path | None = None,
    ram_size: int,
    cpus: int,
    load_address: int | None = None,
) -> LoadedKernel:
    """Load the kernel at ``path`` into ``memory`` (the first ``ram_size`` bytes of its
    writable regions are the guest's RAM) and return how to start it."""
    from pathlib import Path  # imported when a kernel is loaded, not by every run

    from pyvmm.machine.loaders.bzimage import is_bzimage, load_bzimage
    from pyvmm.machine.loaders.elf import is_elf, load_plain_elf, parse_elf
    from pyvmm.machine.loaders.flat import load_flat
    from pyvmm.machine.loaders.multiboot import find_header, load_multiboot
    from pyvmm.machine.loaders.pvh import load_pvh, pvh_entry

    path = Path(path)
    initrd = Path(initrd) if initrd is not None else None
    ram = RamMap(memory, ram_size, cpus, path)  # checks ram_size, the kernel's size limit
    data = read_file(path, limit=ram_size)
    if not data:
        raise ImageError(path, "kernel file is empty")
    request = Request(path, data, memory, ram, cmdline, initrd, load_address)

    header = find_header(data)
    kind = "Multiboot" if header is not None else "bzImage" if is_bzimage(data) else "ELF" if is_elf(data) else None
    if kind is not None and load_address is not None:
        article = "an" if kind == "ELF" else "a"
        raise ImageError(path, f"load_address applies to flat binaries only; this is {article} {kind} kernel")
    if header is not None:
        return load_multiboot(request, header)
    if kind == "bzImage":
        return load_bzimage(request)
    if kind == "ELF":
        image = parse_elf(path, data)
        entry = pvh_entry(path, image)
        if entry is not None:
            return load_pvh(request, image, entry)
        return load_plain_elf(request, image)
    if load_address is None:
        raise ImageError(path, "not a Multiboot, bzImage or ELF kernel (give load_address to load it as a flat binary)")
    return load_flat(request, load_address)
