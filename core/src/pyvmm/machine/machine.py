"""The machine: a VM, its RAM, the board's devices, one thread per vCPU, and the
decision of when and why the run ends.

The guest architecture picks the board: for x86_64 the PC (:mod:`pyvmm.machine.pc`,
port I/O and the PC devices), for aarch64 ``virt`` (:mod:`pyvmm.machine.virt`,
MMIO devices below RAM at 2 GiB, a device tree in X0).  Everything after
construction -- vCPU threads, the run loop, stopping -- is shared.

The machine talks to the backend only through :mod:`pyvmm.vm`, so any backend
that runs the guest's architecture can run it (x86_64 also needs port I/O).
Building it (the constructor) does everything that can fail before the guest
runs: the VM, RAM, the in-kernel irqchip where there is one, the devices and the
boot image (with, on aarch64, the device tree).  Where the hypervisor owns the
boot context (Gunyah), :meth:`pyvmm.vm.Vm.set_boot` hands it the entry and the
device tree and no vCPU register is touched.  :meth:`Machine.run` then starts
one thread per vCPU; each thread creates its own vCPU (vCPU calls must come from
the thread that created it), gives it its CPUID table and boot registers, waits
until every vCPU is ready, and enters :func:`run_loop`.

The first stop request wins: a guest exit (debug port, power-off, reset, triple
fault, system event such as PSCI SYSTEM_OFF, emulation failure), ``timeout``,
Ctrl-C, or an exception in a device or the backend.  It sets the flag every
loop checks on each exit and kicks every running vCPU out of the hypervisor
(``IMMEDIATE_EXIT``), so a vCPU waiting in the guest (an AP that never got a
SIPI, a guest spinning) stops too.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, BinaryIO, cast

from pyvmm.arch.x86_64 import CpuidEntry
from pyvmm.boot import BootSpec
from pyvmm.capabilities import Capability
from pyvmm.config import Arch, VmConfig
from pyvmm.devices.base import IrqLine
from pyvmm.devices.uart import COM1_IRQ
from pyvmm.errors import ConfigError, PyvmmError, VmStateError
from pyvmm.exits import (
    CpuidExit,
    ExitKind,
    FailEntryExit,
    HypercallExit,
    InternalErrorExit,
    MsrAccessExit,
    SystemEvent,
    SystemEventExit,
    VcpuExit,
)
from pyvmm.machine import cpuid
from pyvmm.machine.bus import MmioBus, PortBus
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.images import Aarch64BootSource, BootSource, KernelFile
from pyvmm.machine.layout import ram_ranges
from pyvmm.machine.legacy_firmware import LegacyFirmware, is_multiboot
from pyvmm.machine.outcome import (
    STATUS_CLEAN,
    STATUS_ERROR,
    STATUS_GUEST_FAILED,
    STATUS_INTERRUPTED,
    STATUS_TIMEOUT,
    RunResult,
    StopReason,
)
from pyvmm.machine.pc import PcDevices, PcEvents, install_pc_devices, install_testdev
from pyvmm.machine.stats import MachineStats, VcpuStats
from pyvmm.machine.vcpu_loop import StopFlag, guest_pc, run_loop
from pyvmm.vm import Backend, Vcpu, get_backend

if TYPE_CHECKING:
    # The aarch64 board (and the device-tree library under it) loads only when used.
    from pyvmm.machine.devicetree import Doorbell
    from pyvmm.machine.virt import VirtDevices

log = logging.getLogger("pyvmm.machine")

#: How long to wait for a kicked vCPU thread to leave the hypervisor.
JOIN_GRACE_SECONDS = 10.0
_ENOSYS_U64 = (1 << 64) - errno.ENOSYS
#: SMCCC's "not supported" (-1): the answer to an aarch64 HVC/SMC nobody handles.
_SMCCC_NOT_SUPPORTED = (1 << 64) - 1


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


class Machine:
    """A machine on one backend: the PC for x86_64 guests, ``virt`` for aarch64.
    Runs once; use as a context manager or call :meth:`close`.

    :param config: the settings (a default :class:`MachineConfig` runs the demo guest).
    :param backend: the backend; default: ``config.backend``, else the best available.
    :param image: what to boot instead of ``config.kernel`` or the demo guest: a
        :class:`BootSource` for x86_64, an :class:`Aarch64BootSource` for aarch64.
    :param serial_output: a binary stream for the console (COM1, the PL011)
        instead of ``config.serial``.
    """

    def __init__(
        self,
        config: MachineConfig | None = None,
        *,
        backend: Backend | None = None,
        image: BootSource | Aarch64BootSource | None = None,
        serial_output: BinaryIO | None = None,
    ) -> None:
        self.config = config if config is not None else MachineConfig()
        cfg = self.config
        self.backend = backend if backend is not None else get_backend(cfg.backend)
        self.arch = machine_arch(cfg.arch, self.backend)
        self.irqchip = cfg.irqchip and self.backend.supports(Capability.IRQCHIP)
        if self.arch is Arch.X86_64:
            self.backend.require(Capability.PORT_IO, "the x86 PC machine")
            if cfg.cpus > 1 and not self.irqchip:
                why = "irqchip is off" if self.backend.supports(Capability.IRQCHIP) else "it has no IRQCHIP"
                raise ConfigError(
                    f"cpus: {cfg.cpus} vCPUs need the hypervisor's interrupt controllers, which start the "
                    f"secondary vCPUs on the guest's INIT/SIPI; backend {self.backend.name!r}: {why}"
                )
        else:
            from pyvmm.machine import virt

            # Secondary vCPUs start powered off; the hypervisor's PSCI CPU_ON starts them.
            virt.check_config(cfg.cpus, cfg.memory)
            x86_only = [name for name in ("cpuid_overrides", "testdev", "legacy_bios") if getattr(cfg, name, None)]
            if x86_only:
                raise ConfigError(f"{', '.join(x86_only)}: x86_64 settings; this machine is aarch64")
        self.pio = PortBus()
        self.mmio = MmioBus()
        self._flag = StopFlag()
        self._cond = threading.Condition(threading.RLock())
        self._result: RunResult | None = None
        self._error: BaseException | None = None
        self._running: dict[int, Vcpu] = {}
        self._ready = 0
        self._go = False
        self._halted = 0
        self._ran = False
        self._closed = False
        self._stuck_threads = False
        self._can_kick = self.backend.supports(Capability.IMMEDIATE_EXIT)
        self._stats = [VcpuStats(i) for i in range(cfg.cpus)] if cfg.stats else None
        self._seen_msrs: set[int] = set()
        self._serial_file: BinaryIO | None = None
        self._cpuid_base: list[CpuidEntry] | None = None
        self._cpuid_tables: dict[int, list[CpuidEntry]] = {}
        self._unknown_hypercall = _ENOSYS_U64 if self.arch is Arch.X86_64 else _SMCCC_NOT_SUPPORTED
        #: The irqfds the machine registered, as the device tree lists them.
        self.doorbells: list[Doorbell] = []
        self._eventfds: list[int] = []
        #: The BIOS stand-in (x86_64), when the machine boots through it.
        self.firmware: LegacyFirmware | None = None
        self.devices: PcDevices | VirtDevices
        self.image: BootSource | Aarch64BootSource
        self.vm = self.backend.create_vm(VmConfig(arch=self.arch, vcpus=cfg.cpus))
        try:
            if self.arch is Arch.X86_64:
                self._build_pc(image, serial_output)
            else:
                self._build_virt(image, serial_output)
        except BaseException:
            self.close()
            raise

    # --- construction ---------------------------------------------------------
    def _build_pc(self, image: BootSource | Aarch64BootSource | None, serial_output: BinaryIO | None) -> None:
        cfg = self.config
        for ram in ram_ranges(cfg.memory):
            self.vm.add_memory(ram.start, ram.size)
        if self.irqchip:
            self.vm.create_irqchip()
        self.devices = self._install_devices(serial_output)
        if cfg.testdev:
            lines = self.vm.set_irq_line if self.irqchip and self.backend.supports(Capability.IRQ_LINE) else None
            install_testdev(self.pio, self.mmio, lines)
        if image is not None and not callable(getattr(image, "load", None)):
            raise ConfigError(f"{image.description}: not an x86_64 image")
        source = cast(BootSource, image) if image is not None else self._default_image()
        self.image = source
        self.vm.set_boot(self._legacy_firmware(source.load(self.vm.memory, ram_size=cfg.memory, cpus=cfg.cpus)))
        self._cpuid_base = self._supported_cpuid()

    def _legacy_firmware(self, boot: BootSpec) -> BootSpec:
        """``boot`` through the legacy firmware, where the config or a Multiboot kernel wants it."""
        wanted = self.config.legacy_bios
        if wanted is False or (wanted is None and not is_multiboot(boot)):
            return boot
        rtc = cast(PcDevices, self.devices).rtc
        self.firmware = LegacyFirmware(
            rtc, current_vcpu=self._current_vcpu, wait=self._wait, poweroff=self._on_poweroff, reset=self._on_reset
        )
        return self.firmware.install(self.vm.memory, self.pio, boot)

    def _build_virt(self, image: BootSource | Aarch64BootSource | None, serial_output: BinaryIO | None) -> None:
        from pyvmm.machine import virt
        from pyvmm.machine.devicetree import build_fdt

        cfg = self.config
        for ram in virt.ram_ranges(cfg.memory):
            self.vm.add_memory(ram.start, ram.size)
        if self.irqchip:
            self.vm.create_irqchip()
        serial = serial_output if serial_output is not None else self._open_serial(cfg.serial)
        self.devices = virt.install_virt_devices(
            self.mmio, serial=serial, serial_irq=self._irqfd(virt.UART_SPI), debug_exit=self._on_debug_exit
        )
        if image is not None and not callable(getattr(image, "load_aarch64", None)):
            raise ConfigError(f"{image.description}: not an aarch64 image")
        source = cast(Aarch64BootSource, image) if image is not None else self._default_aarch64_image()
        self.image = source
        # The irqfds exist by now: Gunyah's tree must list each as a doorbell.
        nodes = virt.hypervisor_nodes(self.backend, cfg.memory, self.doorbells)
        tree = virt.board_tree(cfg.cpus, cfg.memory, self.doorbells, nodes)
        boot = source.load_aarch64(self.vm.memory, ram_size=cfg.memory, device_tree=partial(build_fdt, tree))
        self.vm.set_boot(boot)

    def _irqfd(self, line: int) -> IrqLine | None:
        """An interrupt line as an irqfd (edge-triggered: each rise signals the
        eventfd), or None where the backend has none and the guest must poll."""
        if not self.backend.supports(Capability.IRQFD) or not hasattr(os, "eventfd"):
            return None
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._eventfds.append(fd)
        self.vm.register_irqfd(fd, line, level=False)
        from pyvmm.machine.devicetree import Doorbell

        self.doorbells.append(Doorbell(line, level=False))

        def irq(level: bool) -> None:
            if level:
                os.eventfd_write(fd, 1)

        return irq

    def _install_devices(self, serial_output: BinaryIO | None) -> PcDevices:
        cfg = self.config
        serial = serial_output if serial_output is not None else self._open_serial(cfg.serial)
        irq: Callable[[bool], None] | None = None
        if self.irqchip and self.backend.supports(Capability.IRQ_LINE):
            set_line = self.vm.set_irq_line

            def irq(level: bool) -> None:
                set_line(COM1_IRQ, level)

        events = PcEvents(debug_exit=self._on_debug_exit, poweroff=self._on_poweroff, reset=self._on_reset)
        return install_pc_devices(
            self.pio,
            self.mmio,
            events,
            serial=serial,
            serial_irq=irq,
            ram_size=cfg.memory,
            cpus=cfg.cpus,
            irqchip=self.irqchip,
        )

    def _open_serial(self, serial: str) -> BinaryIO | None:
        if serial == "none":
            return None
        if serial == "stdio":
            return sys.stdout.buffer
        try:
            self._serial_file = open(serial, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise ConfigError(f"serial: cannot write {serial}: {exc.strerror or exc}") from exc
        return self._serial_file

    def _default_image(self) -> BootSource:
        cfg = self.config
        if cfg.kernel is not None:
            return KernelFile(cfg.kernel, cfg.append, cfg.initrd, cfg.load_address)
        from pyvmm.guests import demo_image

        return demo_image()

    def _default_aarch64_image(self) -> Aarch64BootSource:
        cfg = self.config
        if cfg.kernel is not None:
            return KernelFile(cfg.kernel, cfg.append, cfg.initrd, cfg.load_address)
        from pyvmm.guests import demo_aarch64_image

        return demo_aarch64_image()

    def _supported_cpuid(self) -> list[CpuidEntry] | None:
        overrides = self.config.cpuid_overrides
        if not self.backend.supports(Capability.CPUID):
            if overrides:
                raise ConfigError(f"cpuid_overrides: backend {self.backend.name!r} cannot set the guest's CPUID")
            return None
        if self.backend.supports(Capability.EARLY_INIT_CPUID):
            if overrides:
                raise ConfigError(f"cpuid_overrides: backend {self.backend.name!r} fixes CPUID when the VM is created")
            return None
        return self.vm.supported_cpuid()

    # --- running ----------------------------------------------------------------
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
        cpus = self.config.cpus
        threads = [
            threading.Thread(target=self._vcpu_thread, args=(i,), name=f"pyvmm-vcpu-{i}", daemon=True)
            for i in range(cpus)
        ]
        restore_sigint = self._catch_sigint()
        try:
            for thread in threads:
                thread.start()
            with self._cond:
                self._cond.wait_for(lambda: self._ready == cpus or self._flag.stopping)
            if not self._flag.stopping:
                try:
                    self.vm.start()
                except BaseException as exc:  # noqa: BLE001 - whatever it is ends the run and is re-raised
                    self._fail(exc)
            with self._cond:
                self._go = True
                self._cond.notify_all()
                stopped = self._cond.wait_for(lambda: self._flag.stopping, self.config.timeout)
            if not stopped:
                self.request_stop(StopReason.TIMEOUT, STATUS_TIMEOUT, f"timeout after {self.config.timeout:g} s")
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self._join(threads)
            restore_sigint()
            self._close_devices()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        if self._stats is not None:
            return replace(self._result, stats=MachineStats(self._stats))
        return self._result

    def _vcpu_thread(self, index: int) -> None:
        try:
            vcpu = self.vm.create_vcpu(index)
            if self._cpuid_base is not None:
                table = cpuid.vcpu_cpuid(self._cpuid_base, index, self.config.cpuid_overrides)
                vcpu.set_cpuid(table)
                self._cpuid_tables[index] = table
            vcpu.apply_boot()
            with self._cond:
                self._ready += 1
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._go or self._flag.stopping)
                if self._flag.stopping:
                    return
                self._running[index] = vcpu
            try:
                self._loop(vcpu)
            finally:
                with self._cond:
                    del self._running[index]
        except BaseException as exc:  # noqa: BLE001 - a vCPU thread reports everything to run()
            self._fail(exc)

    def _current_vcpu(self) -> Vcpu:
        """The vCPU of the calling thread (a device asking on behalf of the guest)."""
        me = threading.get_ident()
        with self._cond:
            for vcpu in self._running.values():
                if vcpu.thread_id == me:
                    return vcpu
        raise VmStateError("not called from a running vCPU's thread")

    def _wait(self, seconds: float | None) -> bool:
        """Block for ``seconds`` (None: until the run stops); False once the run is stopping."""
        with self._cond:
            return not self._cond.wait_for(lambda: self._flag.stopping, seconds)

    def _loop(self, vcpu: Vcpu) -> None:
        if self._stats is None:
            run_loop(vcpu, vcpu.run, flag=self._flag, pio=self.pio, mmio=self.mmio, other_exit=self._other_exit)
            return
        stats = self._stats[vcpu.index]
        start = time.perf_counter_ns()
        try:
            run = stats.timed(vcpu.run)
            run_loop(vcpu, run, flag=self._flag, pio=self.pio, mmio=self.mmio, other_exit=self._other_exit)
        finally:
            stats.wall_ns = time.perf_counter_ns() - start

    # --- stopping ---------------------------------------------------------------
    def request_stop(self, reason: StopReason, status: int, detail: str = "", code: int | None = None) -> None:
        """End the run (the first request wins) and kick every vCPU out of the guest.
        Safe from any thread and from a signal handler."""
        with self._cond:
            if self._result is not None:
                return
            self._result = RunResult(reason, status, detail, code)
            self._flag.stopping = True
            if self._can_kick:
                for vcpu in self._running.values():
                    try:
                        vcpu.kick()
                    except PyvmmError as exc:  # a vCPU closing under us needs no kick
                        log.debug("kick of vCPU %d failed: %s", vcpu.index, exc)
            self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            # Even after a clean stop: an error is never swallowed.
            if self._error is None:
                self._error = exc
        self.request_stop(StopReason.ERROR, STATUS_ERROR, f"{type(exc).__name__}: {exc}")

    def _on_debug_exit(self, code: int, status: int) -> None:
        self.request_stop(StopReason.DEBUG_EXIT, status, f"debug-exit code {code:#x}", code)

    def _on_poweroff(self) -> None:
        self.request_stop(StopReason.POWEROFF, STATUS_CLEAN, "the guest powered off")

    def _on_reset(self) -> None:
        self.request_stop(StopReason.RESET, STATUS_CLEAN, "the guest reset the machine (pyvmm does not reboot)")

    def _catch_sigint(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            self.request_stop(StopReason.INTERRUPTED, STATUS_INTERRUPTED, "interrupted (Ctrl-C)")

        previous = signal.signal(signal.SIGINT, on_sigint)

        def restore() -> None:
            signal.signal(signal.SIGINT, previous)

        return restore

    def _join(self, threads: list[threading.Thread]) -> None:
        deadline = time.monotonic() + JOIN_GRACE_SECONDS
        for thread in threads:
            if thread.ident is not None:
                thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                self._stuck_threads = True
        if self._stuck_threads:
            how = "did not leave" if self._can_kick else "cannot be kicked out of (no IMMEDIATE_EXIT)"
            log.warning("a vCPU %s the hypervisor; its VM is left open", how)

    # --- exits other than port and MMIO I/O ----------------------------------------
    def _other_exit(self, vcpu: Vcpu, exit_: VcpuExit) -> bool:
        kind = exit_.kind
        if kind is ExitKind.INTERRUPTED or kind in (ExitKind.IRQ_WINDOW_OPEN, ExitKind.IOAPIC_EOI, ExitKind.OTHER):
            return False
        where = f"vCPU {vcpu.index}"
        if kind is ExitKind.HLT:
            if self.irqchip:
                return False  # the hypervisor wakes it; an exit here is spurious
            with self._cond:
                self._halted += 1
                if self._halted == self.config.cpus:
                    self.request_stop(StopReason.HALTED, STATUS_CLEAN, "every vCPU halted, with nothing to wake it")
            return True
        if kind is ExitKind.SHUTDOWN:
            self.request_stop(StopReason.TRIPLE_FAULT, STATUS_GUEST_FAILED, f"{where}: triple fault{self._rip(vcpu)}")
            return True
        if isinstance(exit_, SystemEventExit):
            self._system_event(where, exit_)
            return True
        if isinstance(exit_, InternalErrorExit):
            text = internal_error_text(where + self._rip(vcpu), exit_)
            self.request_stop(StopReason.EMULATION_ERROR, STATUS_GUEST_FAILED, text)
            return True
        if isinstance(exit_, FailEntryExit):
            self.request_stop(
                StopReason.ENTRY_FAILED,
                STATUS_GUEST_FAILED,
                f"{where}: the hypervisor could not enter the guest (hardware reason {exit_.reason:#x})",
            )
            return True
        if isinstance(exit_, CpuidExit):
            self._cpuid_exit(vcpu, exit_)
            return False
        if isinstance(exit_, MsrAccessExit):
            self._msr_exit(where, exit_)
            return False
        if isinstance(exit_, HypercallExit):
            exit_.result = self._unknown_hypercall
            return False
        self.request_stop(StopReason.UNEXPECTED_EXIT, STATUS_GUEST_FAILED, f"{where}: unexpected exit {exit_!r}")
        return True

    def _system_event(self, where: str, event: SystemEventExit) -> None:
        if event.event is SystemEvent.SHUTDOWN:
            self.request_stop(StopReason.POWEROFF, STATUS_CLEAN, f"{where}: the guest powered off")
        elif event.event is SystemEvent.RESET:
            self._on_reset()
        else:
            self.request_stop(StopReason.CRASHED, STATUS_GUEST_FAILED, f"{where}: the guest crashed {event.data}")

    def _cpuid_exit(self, vcpu: Vcpu, exit_: CpuidExit) -> None:
        entry = cpuid.lookup(self._cpuid_tables.get(vcpu.index, []), exit_.function, exit_.index)
        if entry is None:
            exit_.eax = exit_.ebx = exit_.ecx = exit_.edx = 0
        else:
            exit_.eax, exit_.ebx, exit_.ecx, exit_.edx = entry.eax, entry.ebx, entry.ecx, entry.edx

    def _msr_exit(self, where: str, exit_: MsrAccessExit) -> None:
        exit_.error = True  # the guest gets #GP, as for an MSR the CPU lacks
        if exit_.index not in self._seen_msrs:
            self._seen_msrs.add(exit_.index)
            what = "write" if exit_.is_write else "read"
            log.warning("%s: unhandled MSR %s of %#x: #GP (logged once per MSR)", where, what, exit_.index)

    @staticmethod
    def _rip(vcpu: Vcpu) -> str:
        pc = guest_pc(vcpu)
        return f" at {pc}" if pc else ""

    # --- teardown -----------------------------------------------------------------
    def _close_devices(self) -> None:
        for bus in (self.pio, self.mmio):
            for device in bus.devices():
                device.close()

    def close(self) -> None:
        """Release the VM and the serial file.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._stuck_threads:
                self.vm.close()
                # Only once the VM is gone: a vCPU thread left in the guest may still signal them.
                for fd in self._eventfds:
                    os.close(fd)
        finally:
            if self._serial_file is not None:
                self._serial_file.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def internal_error_text(where: str, exit_: InternalErrorExit) -> str:
    what = exit_.description or f"internal error, suberror {exit_.suberror}"
    if exit_.instruction:
        return f"{where}: the hypervisor failed: {what}; instruction bytes: {exit_.instruction.hex(' ')}"
    return f"{where}: the hypervisor failed: {what} (instruction bytes not reported)"
