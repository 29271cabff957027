"""The x86_64 machine: a VM, its RAM, the PC devices, one thread per vCPU, and
the decision of when and why the run ends.

The machine talks to the backend only through :mod:`pyvmm.vm`, so any backend
that runs x86_64 guests with port I/O can run it.  Building it (the constructor)
does everything that can fail before the guest runs: the VM, RAM, the in-kernel
irqchip where there is one, the devices and the boot image.  :meth:`Machine.run`
then starts one thread per vCPU; each thread creates its own vCPU (vCPU calls
must come from the thread that created it), gives it its CPUID table and boot
registers, waits until every vCPU is ready, and enters :func:`run_loop`.

The first stop request wins: a guest exit (debug port, power-off, reset, triple
fault, system event, emulation failure), ``timeout``, Ctrl-C, or an exception in
a device or the backend.  It sets the flag every loop checks on each exit and
kicks every running vCPU out of the hypervisor (``IMMEDIATE_EXIT``), so a vCPU
waiting in the guest (an AP that never got a SIPI, a guest spinning) stops too.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from types import FrameType
from typing import BinaryIO

from pyvmm.arch.x86_64 import CpuidEntry
from pyvmm.capabilities import Capability
from pyvmm.config import Arch, VmConfig
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
from pyvmm.machine.images import BootSource, KernelFile
from pyvmm.machine.layout import ram_ranges
from pyvmm.machine.outcome import (
    STATUS_CLEAN,
    STATUS_ERROR,
    STATUS_GUEST_FAILED,
    STATUS_INTERRUPTED,
    STATUS_TIMEOUT,
    RunResult,
    StopReason,
)
from pyvmm.machine.pc import PcDevices, PcEvents, install_pc_devices
from pyvmm.machine.stats import MachineStats, VcpuStats
from pyvmm.machine.vcpu_loop import StopFlag, run_loop
from pyvmm.vm import Backend, Vcpu, get_backend

log = logging.getLogger("pyvmm.machine")

#: How long to wait for a kicked vCPU thread to leave the hypervisor.
JOIN_GRACE_SECONDS = 10.0
_ENOSYS_U64 = (1 << 64) - errno.ENOSYS


class Machine:
    """An x86_64 PC-like machine on one backend.  Runs once; use as a context
    manager or call :meth:`close`.

    :param config: the settings (a default :class:`MachineConfig` runs the demo guest).
    :param backend: the backend; default: ``config.backend``, else the best available.
    :param image: what to boot instead of ``config.kernel`` or the demo guest.
    :param serial_output: a binary stream for COM1 instead of ``config.serial``.
    """

    def __init__(
        self,
        config: MachineConfig | None = None,
        *,
        backend: Backend | None = None,
        image: BootSource | None = None,
        serial_output: BinaryIO | None = None,
    ) -> None:
        self.config = config if config is not None else MachineConfig()
        cfg = self.config
        self.backend = backend if backend is not None else get_backend(cfg.backend)
        self.backend.require(Capability.PORT_IO, "the x86 PC machine")
        self.irqchip = cfg.irqchip and self.backend.supports(Capability.IRQCHIP)
        if cfg.cpus > 1 and not self.irqchip:
            why = "irqchip is off" if self.backend.supports(Capability.IRQCHIP) else "it has no IRQCHIP"
            raise ConfigError(
                f"cpus: {cfg.cpus} vCPUs need the hypervisor's interrupt controllers, which start the "
                f"secondary vCPUs on the guest's INIT/SIPI; backend {self.backend.name!r}: {why}"
            )
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
        self.vm = self.backend.create_vm(VmConfig(arch=Arch.X86_64, vcpus=cfg.cpus))
        try:
            for ram in ram_ranges(cfg.memory):
                self.vm.add_memory(ram.start, ram.size)
            if self.irqchip:
                self.vm.create_irqchip()
            self.devices = self._install_devices(serial_output)
            self.image: BootSource = image if image is not None else self._default_image()
            self.vm.set_boot(self.image.load(self.vm.memory, ram_size=cfg.memory, cpus=cfg.cpus))
            self._cpuid_base = self._supported_cpuid()
        except BaseException:
            self.close()
            raise

    # --- construction ---------------------------------------------------------
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
            exit_.result = _ENOSYS_U64
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
        if not vcpu.vm.backend.supports(Capability.VCPU_REGISTERS):
            return ""
        try:
            return f" at rip {vcpu.get_regs().rip:#x}"
        except PyvmmError:
            return ""

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
