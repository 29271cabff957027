"""Coalesced writes for the machine's devices that opt in.

A device whose writes may take effect at the guest's next exit rather than at
once sets :attr:`pyvmm.devices.base.Device.coalesced_writes`.  When the backend
declares ``COALESCED_IO`` (and ``COALESCED_PIO`` for a device on ports), the
machine registers the device's ranges as coalesced zones: the guest's writes to
it no longer exit (:mod:`pyvmm.coalesced`).  Every vCPU's run function is then
wrapped so that, after each exit and before the exit is handled, the recorded
writes are delivered to their devices in guest order -- a device therefore sees
them before the access that made the guest exit, whatever that access is.

Which devices qualify: those where nothing the guest can observe depends on a
write having been handled before its next exit -- no interrupt raised by the
write, no timer started, no memory written on the guest's behalf.  A read of
the device still exits and is answered after the pending writes are delivered.
Nothing is registered when no device opts in, and then the run functions are
not wrapped: the exit path costs nothing more.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pyvmm.capabilities import Capability
from pyvmm.exits import VcpuExit
from pyvmm.lazy_logging import LazyLogger
from pyvmm.machine.bus import Bus, MmioBus, PortBus
from pyvmm.vcpu_state import AddressSpace, IoEventAddress
from pyvmm.vm import Vm

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.machine")


class CoalescedDevices:
    """The coalesced zones of one machine, and the delivery of their writes."""

    def __init__(self, vm: Vm, pio: PortBus, mmio: MmioBus) -> None:
        self.vm = vm
        self.buses: dict[AddressSpace, Bus] = {AddressSpace.PIO: pio, AddressSpace.MMIO: mmio}
        self.zones: list[tuple[IoEventAddress, int]] = []
        # One ring for the whole VM: two vCPU threads must not take it at once,
        # and devices get the writes one at a time, in order.
        self._lock = threading.Lock()

    def register(self) -> bool:
        """Register every opted-in device's ranges the backend can coalesce;
        True when at least one zone was registered.  A device the backend
        cannot coalesce keeps exiting as before (logged at debug level)."""
        caps = self.vm.backend.capabilities
        if Capability.COALESCED_IO not in caps:
            return False
        for space, bus in self.buses.items():
            for base, size, device in bus.ranges:
                if not device.coalesced_writes:
                    continue
                if space is AddressSpace.PIO and Capability.COALESCED_PIO not in caps:
                    log.debug("%s: ports are not coalesced by backend %s", device.name, self.vm.backend.name)
                    continue
                zone = IoEventAddress(space, base)
                self.vm.register_coalesced_io(zone, size)
                self.zones.append((zone, size))
        return bool(self.zones)

    def deliver(self) -> None:
        """Hand every recorded write to its device, oldest first."""
        with self._lock:
            for write in self.vm.take_coalesced_io():
                data = write.data
                self.buses[write.space].write(write.address, len(data), int.from_bytes(data, "little"))

    def draining(self, run: Callable[[], VcpuExit]) -> Callable[[], VcpuExit]:
        """``run``, delivering the recorded writes after each exit, before the
        exit is returned to be handled."""
        deliver = self.deliver

        def run_then_deliver() -> VcpuExit:
            exit_ = run()
            deliver()
            return exit_

        return run_then_deliver
