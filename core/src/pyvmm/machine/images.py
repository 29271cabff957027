"""What the machine boots: a kernel file (through :mod:`pyvmm.machine.loaders`) or
an image already in memory (the bundled demo guests, test programs).

Either one writes itself into guest RAM and returns the :class:`BootSpec` of the
boot vCPU, before any vCPU exists; every problem is reported then, never once
the guest runs.  An x86_64 image is a :class:`BootSource`, an aarch64 one an
:class:`Aarch64BootSource`, which also places the device tree the board builds;
:class:`KernelFile` is both.
"""

from __future__ import annotations

from dataclasses import field
from typing import TYPE_CHECKING, Protocol

from pyvmm.arch.x86_64_boot import BOOT_TABLE_PAGES
from pyvmm.boot import BootSpec, X86Mode
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.errors import ConfigError
from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.memory import GuestMemory
from pyvmm.records import RecordError

if TYPE_CHECKING:
    from pathlib import Path

    from pyvmm.machine.loaders.arm64 import DeviceTreeBuilder

#: Where in-memory images keep the boot GDT and page tables (BootSpec's default).
BOOT_TABLES = 0x1000


class BootSource(Protocol):
    @property
    def description(self) -> str: ...

    def load(self, memory: GuestMemory, *, ram_size: int, cpus: int) -> BootSpec:
        """Write the image into ``memory`` and say how the boot vCPU starts."""
        ...


class Aarch64BootSource(Protocol):
    @property
    def description(self) -> str: ...

    def load_aarch64(self, memory: GuestMemory, *, ram_size: int, device_tree: DeviceTreeBuilder) -> BootSpec:
        """Write the image and the device tree ``device_tree`` builds into ``memory``
        and say how the boot vCPU starts (entry, ``fdt_address``, ``fdt_size``)."""
        ...


@lean_dataclass(frozen=True)
class GuestImage:
    """Bytes to place at guest-physical addresses, and an entry point."""

    name: str
    segments: tuple[tuple[int, bytes], ...]
    entry: int
    mode: X86Mode = X86Mode.LONG
    stack: int | None = None
    registers: dict[str, int] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return self.name

    def load(self, memory: GuestMemory, *, ram_size: int, cpus: int) -> BootSpec:
        tables = range(BOOT_TABLES, BOOT_TABLES + BOOT_TABLE_PAGES * PAGE_SIZE)
        try:
            # Built first: a bad entry, stack or register is refused before a byte is written.
            boot = BootSpec(
                arch=Arch.X86_64,
                entry=self.entry,
                x86_mode=self.mode,
                stack=self.stack,
                registers=dict(self.registers),
                boot_tables=BOOT_TABLES,
            )
        except RecordError as exc:
            raise ConfigError(f"{self.name}: cannot start it: {exc}") from None
        for address, data in self.segments:
            end = address + len(data)
            if not memory.contains(address, len(data)):
                raise ConfigError(
                    f"{self.name}: {len(data)} bytes at {address:#x} do not fit in guest RAM ({ram_size:#x} bytes)"
                )
            if self.mode is not X86Mode.REAL and address < tables.stop and tables.start < end:
                raise ConfigError(
                    f"{self.name}: bytes at {address:#x}..{end:#x} overlap the boot tables at "
                    f"{tables.start:#x}..{tables.stop:#x}"
                )
        # Every segment is checked before the first is written.
        for address, data in self.segments:
            memory.write(address, data)
        return boot


@lean_dataclass(frozen=True)
class Aarch64Image:
    """A64 code to run at ``address`` (in guest RAM), entered at EL1 with X0 = the
    device tree, as a kernel is."""

    name: str
    code: bytes
    address: int

    @property
    def description(self) -> str:
        return self.name

    def load_aarch64(self, memory: GuestMemory, *, ram_size: int, device_tree: DeviceTreeBuilder) -> BootSpec:
        from pyvmm.machine.loaders.arm64 import load_arm64_bytes

        loaded = load_arm64_bytes(
            self.name, self.code, memory, ram_size=ram_size, device_tree=device_tree, load_address=self.address
        )
        return loaded.boot


@lean_dataclass(frozen=True)
class KernelFile:
    """A kernel image on disk, loaded by :func:`pyvmm.machine.loaders.load_kernel`."""

    path: Path
    cmdline: str = ""
    initrd: Path | None = None
    load_address: int | None = None

    @property
    def description(self) -> str:
        return str(self.path)

    def load(self, memory: GuestMemory, *, ram_size: int, cpus: int) -> BootSpec:
        try:
            from pyvmm.machine.loaders import load_kernel
        except ImportError as exc:
            raise ConfigError(f"{self.path}: this pyvmm cannot load kernel files ({exc})") from exc
        loaded = load_kernel(
            self.path,
            memory,
            cmdline=self.cmdline,
            initrd=self.initrd,
            ram_size=ram_size,
            cpus=cpus,
            load_address=self.load_address,
        )
        return loaded.boot

    def load_aarch64(self, memory: GuestMemory, *, ram_size: int, device_tree: DeviceTreeBuilder) -> BootSpec:
        from pyvmm.machine.loaders.arm64 import load_arm64_kernel

        loaded = load_arm64_kernel(
            self.path,
            memory,
            ram_size=ram_size,
            device_tree=device_tree,
            cmdline=self.cmdline,
            initrd=self.initrd,
            load_address=self.load_address,
        )
        return loaded.boot
