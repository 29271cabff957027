"""The machine: a VM, its RAM, the board's devices, and one run of its vCPUs.

The guest architecture picks the board (:class:`~pyvmm.machine.board.Board`): for
x86_64 the PC (:class:`~pyvmm.machine.pc.PcBoard`, port I/O and the PC devices),
for aarch64 ``virt`` (:class:`~pyvmm.machine.virt.VirtBoard`, MMIO devices below
RAM at 2 GiB, a device tree in X0).  The board lays the machine out; the
:class:`~pyvmm.machine.runner.Runner` runs the vCPU threads and decides when the
run ends; this module only puts the two together around one VM.

The machine talks to the backend only through :mod:`pyvmm.vm`, so any backend
that runs the guest's architecture can run it (x86_64 also needs port I/O).
Building it (the constructor) does everything that can fail before the guest
runs: the board's checks, the VM, RAM, the in-kernel irqchip where there is one,
the devices and the boot image (with, on aarch64, the device tree).  Where the
hypervisor owns the boot context, :meth:`pyvmm.vm.Vm.set_boot` hands it the entry
and the device tree and no vCPU register is touched.  :meth:`Machine.run` runs
the guest once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, cast

from pyvmm.config import Arch, VmConfig
from pyvmm.errors import ConfigError, VmStateError
from pyvmm.machine.board import BoardParts, interrupt_controllers
from pyvmm.machine.bus import MmioBus, PortBus
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.console import ConsoleOutput, open_serial
from pyvmm.machine.images import Aarch64BootSource, BootSource
from pyvmm.machine.outcome import RunResult, StopReason
from pyvmm.machine.pc import PcBoard, PcDevices
from pyvmm.machine.runner import Debugger, Runner
from pyvmm.vm import Backend, get_backend

if TYPE_CHECKING:
    from pyvmm.machine.legacy_firmware import LegacyFirmware

    # The aarch64 board (and the device-tree library under it) loads only when used.
    from pyvmm.machine.snapshots import MachineSnapshots
    from pyvmm.machine.virt import VirtBoard, VirtDevices
    from pyvmm.snapshot import Snapshot


def machine_arch(arch: Arch | None, backend: Backend) -> Arch:
    """The guest architecture: ``arch``, else the backend's only one, else x86_64.

    :raises ConfigError: the backend does not run that architecture.
    """
    arches = backend.manifest.guest_arches
    if arch is None:
        arch = arches[0] if len(arches) == 1 else Arch.X86_64
    if arch not in arches:
        runs = ", ".join(a.value for a in arches)
        raise ConfigError(f"arch: backend {backend.name!r} runs {runs} guests, not {arch.value}")
    return arch


def board_class(arch: Arch) -> type[PcBoard] | type[VirtBoard]:
    """The board for guests of ``arch``."""
    if arch is Arch.X86_64:
        return PcBoard
    from pyvmm.machine.virt import VirtBoard

    return VirtBoard


class Machine:
    """A machine on one backend: the PC for x86_64 guests, ``virt`` for aarch64.
    Runs once; use as a context manager or call :meth:`close`.

    :param config: the settings (a default :class:`MachineConfig` runs the demo guest).
    :param backend: the backend; default: ``config.backend``, else the best available.
    :param image: what to boot instead of ``config.kernel`` or the demo guest: a
        :class:`BootSource` for x86_64, an :class:`Aarch64BootSource` for aarch64.
    :param serial_output: a binary stream for the console (COM1, the PL011)
        instead of ``config.serial``.
    :param restore: a snapshot (or its file) to continue from instead of
        booting: saved by a machine of the same configuration
        (:mod:`pyvmm.machine.snapshots`).
    :param snapshot_to: save a snapshot to this file, and stop, when the guest
        writes port 0x5f0 or after ``snapshot_after`` seconds.
    """

    def __init__(
        self,
        config: MachineConfig | None = None,
        *,
        backend: Backend | None = None,
        image: BootSource | Aarch64BootSource | None = None,
        serial_output: BinaryIO | None = None,
        restore: Snapshot | str | os.PathLike[str] | None = None,
        snapshot_to: str | os.PathLike[str] | None = None,
        snapshot_after: float | None = None,
    ) -> None:
        self.config = config if config is not None else MachineConfig()
        cfg = self.config
        if restore is not None:
            from pyvmm.machine.snapshots import vcpus_in_hlt_wait
            from pyvmm.snapshot import Snapshot, load

            # Checked whole before anything is built: a damaged file creates no VM.
            restore = restore if isinstance(restore, Snapshot) else load(restore)
            vcpus_in_hlt_wait(restore)  # the machine's own record in it too
        self.backend = backend if backend is not None else get_backend(cfg.backend, arch=cfg.arch)
        self.arch = machine_arch(cfg.arch, self.backend)
        #: The hypervisor's interrupt controllers, or the board's own (``irqchip`` setting).
        self.irqchip, self.userspace_irqchip = interrupt_controllers(cfg.irqchip, self.backend, self.arch)
        board = board_class(self.arch)
        board.check(cfg, self.backend, self.irqchip)
        self.pio = PortBus()
        self.mmio = MmioBus()
        self._ran = False
        self._closed = False
        self._serial_file: ConsoleOutput | None = None
        self._snapshots: MachineSnapshots | None = None
        self.vm = self.backend.create_vm(VmConfig(arch=self.arch, vcpus=cfg.cpus))
        self._runner = Runner(self.vm, cfg, self.pio, self.mmio, irqchip=self.irqchip)
        parts = BoardParts(
            cfg, self.backend, self.vm, self.pio, self.mmio, self.irqchip, self._runner.events, self.userspace_irqchip
        )
        self._board: PcBoard | VirtBoard = board(parts)
        try:
            serial = serial_output if serial_output is not None else self._open_serial(cfg.serial)
            self._board.build(image, serial)
            self._connect_console()
            self._snapshots = self._snapshot_side(restore, snapshot_to, snapshot_after)
        except BaseException:
            self.close()
            raise

    def _snapshot_side(
        self,
        restore: Snapshot | str | os.PathLike[str] | None,
        snapshot_to: str | os.PathLike[str] | None,
        snapshot_after: float | None,
    ) -> MachineSnapshots | None:
        """The snapshot request port (the PC's port 0x5f0, the ``virt`` board's
        MMIO page at 0x0a00_2000), so a guest that asks runs the same with or
        without a snapshot being taken, and the restore."""
        from pyvmm.machine.snapshot_port import SNAPSHOT_PORT, SnapshotRequestPort

        def register_request(port: SnapshotRequestPort) -> None:
            if self.arch is Arch.X86_64:
                self.pio.register(SNAPSHOT_PORT, 1, port)
            else:
                from pyvmm.machine.virt import VIRT_SNAPSHOT_REQUEST_BASE, VIRT_SNAPSHOT_REQUEST_SIZE

                self.mmio.register(VIRT_SNAPSHOT_REQUEST_BASE, VIRT_SNAPSHOT_REQUEST_SIZE, port)

        if restore is None and snapshot_to is None and snapshot_after is None:
            # Only the port: the snapshot machinery is imported by the machines
            # that save or restore (a start-up cost for every other run).
            register_request(SnapshotRequestPort())
            return None
        from pyvmm.machine.snapshots import MachineSnapshots

        snapshots = MachineSnapshots(
            self.vm,
            self._runner,
            self.pio,
            self.mmio,
            save_to=snapshot_to,
            save_after=snapshot_after,
            register_request=register_request,
        )
        if restore is not None:
            snapshots.restore(restore, self.config.cpus)
        return snapshots

    @property
    def devices(self) -> PcDevices | VirtDevices:
        """The board's devices."""
        return self._board.devices

    @property
    def image(self) -> BootSource | Aarch64BootSource:
        """What the machine boots."""
        return self._board.image

    @property
    def firmware(self) -> LegacyFirmware | None:
        """The BIOS stand-in (x86_64), when the machine boots through it."""
        return self._board.firmware if isinstance(self._board, PcBoard) else None

    def _connect_console(self) -> None:
        """A pty or socket console from ``config.serial``: its input goes to the UART."""
        if self._serial_file is not None:
            self._serial_file.connect(self._board.devices.uart, self.console_quit)

    def _open_serial(self, serial: str) -> BinaryIO | None:
        """The console output: opened without blocking, write errors reported once."""
        console = open_serial(serial, "serial", {}, interactive=False)
        if console is not None and serial != "stdio":
            self._serial_file = console
        # A write-only stream as far as the UARTs are concerned.
        return cast(BinaryIO, console)

    def run(self) -> RunResult:
        """Run the guest until it stops; return why and with which status.

        :raises DeviceError: a device raised (the cause is chained).
        :raises PyvmmError: the backend failed.
        """
        if self._closed:
            raise VmStateError("the machine is closed")
        if self._ran:
            raise VmStateError("a machine runs once: build a new one")
        self._ran = True
        result = self._runner.run(self._board)
        if result.reason is StopReason.SNAPSHOT and self._snapshots is not None:
            self._snapshots.save()
        return result

    def attach_debugger(self, debugger: Debugger) -> None:
        """Let ``debugger`` (the gdb stub) hold and release the vCPUs: before
        :meth:`run`."""
        self._runner.debugger = debugger

    def count_exits(self) -> Callable[[], tuple[int, int]]:
        """Count exits and guest time during :meth:`run`; the function returned
        reads (exits, guest nanoseconds) so far, from any thread."""
        return self._runner.count_exits()

    def console_quit(self) -> None:
        """End the run as the console's Ctrl-A x does (status 0)."""
        self.request_stop(StopReason.INTERRUPTED, 0, "quit from the console (Ctrl-A x)")

    def request_stop(self, reason: StopReason, status: int, detail: str = "", code: int | None = None) -> None:
        """End the run (the first request wins) and kick every vCPU out of the guest.
        Safe from any thread and from a signal handler."""
        self._runner.request_stop(reason, status, detail, code)

    def close(self) -> None:
        """Release the VM, what the board holds and the serial file.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            # A vCPU thread left in the guest still uses the VM and the board's
            # resources: both stay open then.
            if not self._runner.stuck_threads:
                self.vm.close()
                self._board.close()
        finally:
            if self._serial_file is not None:
                self._serial_file.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
