"""Served registers for the machine's devices that declare them.

A device lists in :meth:`pyvmm.devices.base.Device.served_spans` the registers
the backend may answer without an exit (:mod:`pyvmm.served_io`: the ACPI PM
timer is one).  Where the backend declares ``SERVED_IO`` the machine registers
each span before the vCPUs start, and the guest's accesses to it are answered
inside the backend's run; elsewhere (or for an access the register does not
answer, such as a PM timer write) the device's own read and write answer as
before, with the same values.
"""

from __future__ import annotations

from pyvmm.capabilities import Capability
from pyvmm.machine.bus import Bus, MmioBus, PortBus
from pyvmm.vcpu_state import AddressSpace, IoEventAddress
from pyvmm.vm import Vm


def serve_device_registers(vm: Vm, pio: PortBus, mmio: MmioBus) -> int:
    """Register every device's served spans with the backend; how many were."""
    if Capability.SERVED_IO not in vm.backend.capabilities:
        return 0
    buses: tuple[tuple[AddressSpace, Bus], ...] = ((AddressSpace.PIO, pio), (AddressSpace.MMIO, mmio))
    served = 0
    for space, bus in buses:
        for base, _, device in bus.ranges:
            for span in device.served_spans():
                vm.serve_io(IoEventAddress(space, base + span.offset), span.size, span.register)
                served += 1
    return served
