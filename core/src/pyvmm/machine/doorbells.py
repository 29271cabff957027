"""Doorbells: device registers whose writes signal an event instead of exiting.

A device lists its doorbells (:attr:`pyvmm.devices.base.Device.doorbells`, a
virtqueue notify register, say).  Where the backend declares ``IOEVENTS`` (and
``PIO_IOEVENTS`` for a port), the machine registers each as an ioevent on an
event of its own (``Vm.register_ioevent``): a guest write then signals the event
inside the hypervisor and the guest continues at once, with no exit.  One
machine thread waits on all the events and calls the device's
:meth:`~pyvmm.devices.base.Device.doorbell_rung`; a device that raises there
stops the machine as a device raising on a vCPU thread does.  Where the backend
has no ioevents, nothing is registered and the write exits to the device's
``write`` as before.

The thread waits with ``select`` on the events' descriptors, which POSIX hosts
have for every event; on Windows doorbells fall back to exits.  Everything made
here -- registrations, events, the thread -- is undone by :meth:`Doorbells.close`,
and by :meth:`Doorbells.register` itself when it fails half-way.
"""

from __future__ import annotations

import select
import sys
import threading
from collections.abc import Callable

from pyvmm.capabilities import Capability
from pyvmm.devices.base import Device, Doorbell
from pyvmm.host import Event
from pyvmm.lazy_logging import LazyLogger
from pyvmm.machine.bus import MmioBus, PortBus
from pyvmm.machine.vcpu_loop import DeviceError
from pyvmm.vcpu_state import AddressSpace, IoEventAddress
from pyvmm.vm import Vm

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.machine")

_Bell = tuple[Event, IoEventAddress, Doorbell, Device]


class Doorbells:
    """The doorbells of one machine: their ioevents, events and thread.

    :param on_error: called (on the doorbell thread) with what a device raised;
        the thread then stops serving.
    """

    def __init__(self, vm: Vm, pio: PortBus, mmio: MmioBus, on_error: Callable[[BaseException], None]) -> None:
        self.vm = vm
        self.pio = pio
        self.mmio = mmio
        self.on_error = on_error
        self.bells: list[_Bell] = []
        self._stop: Event | None = None
        self._thread: threading.Thread | None = None

    def register(self) -> bool:
        """Register every doorbell the backend can turn into an ioevent; True
        when there is at least one.

        :raises PyvmmError: the backend refused one (those already registered
            are unregistered and their events closed first).
        """
        caps = self.vm.backend.capabilities
        if sys.platform == "win32" or Capability.IOEVENTS not in caps:
            return False
        try:
            for space, bus in ((AddressSpace.PIO, self.pio), (AddressSpace.MMIO, self.mmio)):
                if space is AddressSpace.PIO and Capability.PIO_IOEVENTS not in caps:
                    continue
                for base, _, device in bus.ranges:
                    for bell in device.doorbells:
                        self._register_one(IoEventAddress(space, base + bell.offset), bell, device)
        except BaseException:
            self._unregister_all()
            raise
        return bool(self.bells)

    def _register_one(self, address: IoEventAddress, bell: Doorbell, device: Device) -> None:
        event = Event()
        try:
            self.vm.register_ioevent(event, address, bell.datamatch, bell.size)
        except BaseException:
            event.close()
            raise
        self.bells.append((event, address, bell, device))

    def start(self) -> None:
        """Start the thread that calls the devices (once, after :meth:`register`)."""
        self._stop = Event()
        self._thread = threading.Thread(target=self._serve, name="pyvmm-doorbells", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        stop = self._stop
        assert stop is not None
        by_fd = {event.fileno(): (event, bell, device) for event, _, bell, device in self.bells}
        by_address = {
            event.fileno(): f"{address.space.value} {address.address:#x}" for event, address, _, _ in self.bells
        }
        fds = [*by_fd, stop.fileno()]
        while True:
            ready, _, _ = select.select(fds, [], [])
            if stop.fileno() in ready:
                return
            for fd in ready:
                event, bell, device = by_fd[fd]
                event.consume()
                try:
                    device.doorbell_rung(bell)
                except Exception as exc:  # noqa: BLE001 - handed to the machine, which stops and re-raises
                    what = f"{type(exc).__name__}: {exc}"
                    error = DeviceError(f"device {device.name!r} failed on its doorbell at {by_address[fd]}: {what}")
                    error.__cause__ = exc
                    self.on_error(error)
                    return
                except BaseException as exc:  # noqa: BLE001 - SystemExit and the like: the machine wraps them
                    self.on_error(exc)
                    return

    def close(self) -> None:
        """Stop the thread, unregister every ioevent and close the events."""
        if self._thread is not None and self._stop is not None:
            self._stop.signal()
            self._thread.join()
            self._stop.close()
        self._thread = self._stop = None
        self._unregister_all()

    def _unregister_all(self) -> None:
        bells, self.bells = self.bells, []
        for event, address, bell, device in bells:
            try:
                self.vm.unregister_ioevent(event, address, bell.datamatch, bell.size)
            except Exception:
                log.debug("unregistering the doorbell of %s at %s failed", device.name, address, exc_info=True)
            event.close()
