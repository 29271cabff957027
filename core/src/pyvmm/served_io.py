"""Served registers: guest accesses the backend answers without returning to the VMM.

An exit that reaches Python costs far more than one a backend answers next to
its run loop (on a software KVM, most of an exit round trip is the return to
user space and the interpreter's cold caches after it).  Some registers are so
simple that the backend can answer them itself, exactly as the device would:
a register that always reads the same value, ports that read back the byte last
written to them, the ACPI PM timer.  A VMM registers such a range with
:meth:`pyvmm.vm.Vm.serve_io` (``SERVED_IO``); the guest's accesses to it are
then answered inside the backend's ``run`` and never come back as exits.

The records below are the whole vocabulary, so that every backend answers an
access the same way and its tests can compare a compiled path with a pure one:

* :class:`ConstantRegister` -- every read answers ``value`` (its low bytes, at
  the access width); writes are ignored.
* :class:`LatchedBytes` -- each byte of the range keeps the low byte of the last
  value written at it and reads back as that byte, zero-extended to the access
  width (:class:`pyvmm.devices.sinks.PortSink`'s behaviour); every byte starts
  as ``initial``.  Its state lives in the backend once served.
* :class:`PmTimerRegister` -- 4-byte reads answer the 24-bit count of a
  3.579545 MHz clock started at ``start_ns`` of :func:`time.monotonic_ns`
  (:class:`pyvmm.devices.acpi_pm.AcpiPm`'s ``PM_TMR``).  Other accesses to it
  exit as usual.

A served range never overlaps another served range or a coalesced zone.
"""

from __future__ import annotations

from pyvmm.errors import ConfigError
from pyvmm.lean_dataclass import lean_dataclass

#: The PM timer's rate and width (ACPI 6.5, 4.8.3.3 "Power Management Timer").
PM_TIMER_HZ = 3_579_545
PM_TIMER_MASK = 0xFF_FFFF
#: The only access width a PM timer register answers.
PM_TIMER_WIDTH = 4
#: The most served ranges one VM may hold.
MAX_SERVED_RANGES = 32


@lean_dataclass(frozen=True)
class ConstantRegister:
    """Reads answer ``value`` (0 <= value < 2**64); writes are ignored."""

    value: int

    def check(self) -> None:
        _check_u("ConstantRegister.value", self.value, 64)


@lean_dataclass(frozen=True)
class LatchedBytes:
    """Each byte reads back the low byte last written at it (``initial`` first)."""

    initial: int = 0xFF

    def check(self) -> None:
        _check_u("LatchedBytes.initial", self.initial, 8)


@lean_dataclass(frozen=True)
class PmTimerRegister:
    """4-byte reads answer the ACPI PM timer counted from ``start_ns``
    (:func:`time.monotonic_ns`)."""

    start_ns: int

    def check(self) -> None:
        _check_u("PmTimerRegister.start_ns", self.start_ns, 64)


ServedRegister = ConstantRegister | LatchedBytes | PmTimerRegister


@lean_dataclass(frozen=True)
class ServedSpan:
    """``size`` bytes at ``offset`` of a device, answered as ``register``: what a
    device declares in :meth:`pyvmm.devices.base.Device.served_spans`."""

    offset: int
    size: int
    register: ServedRegister


def pm_timer_count(start_ns: int, now_ns: int) -> int:
    """The PM timer's count at ``now_ns`` for a timer started at ``start_ns``."""
    return (now_ns - start_ns) * PM_TIMER_HZ // 1_000_000_000 & PM_TIMER_MASK


def check_served(register: object, size: int) -> None:
    """Refuse a register record or size no backend can serve.

    :raises ConfigError: ``register`` is not one of the records here, a field is
        out of range, or a PM timer is not exactly :data:`PM_TIMER_WIDTH` bytes.
    """
    if not isinstance(register, (ConstantRegister, LatchedBytes, PmTimerRegister)):
        raise ConfigError(
            f"a served register is a ConstantRegister, LatchedBytes or PmTimerRegister, not {type(register).__name__}"
        )
    register.check()
    if isinstance(register, PmTimerRegister) and size != PM_TIMER_WIDTH:
        raise ConfigError(f"a PM timer register is {PM_TIMER_WIDTH} bytes, not {size}")


def _check_u(name: str, value: object, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ConfigError(f"{name}: {value!r} is out of range: must be an integer from 0 to {(1 << bits) - 1:#x}")
