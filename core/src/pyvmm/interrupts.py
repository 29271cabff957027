"""Interrupt routing records: where a GSI (global system interrupt) goes.

A VM with an in-hypervisor interrupt controller numbers its interrupt inputs as
GSIs; :meth:`pyvmm.vm.Vm.set_gsi_routing` says what each GSI drives: a pin of one
of the hypervisor's interrupt controllers (:class:`IrqchipRoute`) or a message
signalled interrupt (:class:`MsiRoute`).  The same GSI may appear more than once
(on the PC, GSIs 0-15 drive a PIC pin and an IOAPIC pin both).  These mirror
crosvm's ``IrqRoute``/``IrqSource``.
"""

from __future__ import annotations

import enum

from pyvmm.errors import ConfigError
from pyvmm.lean_dataclass import lean_dataclass


class IrqChip(enum.Enum):
    """An interrupt controller the hypervisor emulates."""

    PIC_PRIMARY = "pic_primary"
    PIC_SECONDARY = "pic_secondary"
    IOAPIC = "ioapic"
    GIC = "gic"


def _check_int(record: object, name: str, value: object, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        top = (1 << bits) - 1
        where = f"{type(record).__name__}.{name}"
        raise ConfigError(f"{where}: {value!r} is out of range: must be an integer from 0 to {top:#x}")


@lean_dataclass(frozen=True, slots=True)
class IrqchipRoute:
    """GSI ``gsi`` drives input ``pin`` of ``chip``."""

    gsi: int
    chip: IrqChip
    pin: int

    def __post_init__(self) -> None:
        _check_int(self, "gsi", self.gsi, 32)
        _check_int(self, "pin", self.pin, 32)
        if not isinstance(self.chip, IrqChip):
            raise ConfigError(f"IrqchipRoute.chip: an IrqChip, not {self.chip!r}")


@lean_dataclass(frozen=True, slots=True)
class MsiRoute:
    """GSI ``gsi`` sends the message ``data`` to ``address`` (on x86 the local APIC
    window: ``0xfee00000 | destination << 12``, the vector in ``data``'s low byte)."""

    gsi: int
    address: int
    data: int

    def __post_init__(self) -> None:
        _check_int(self, "gsi", self.gsi, 32)
        _check_int(self, "address", self.address, 64)
        _check_int(self, "data", self.data, 32)


IrqRoute = IrqchipRoute | MsiRoute
