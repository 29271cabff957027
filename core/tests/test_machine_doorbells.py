"""pyvmm.machine.doorbells without a guest: what gets registered, and nothing
left behind when a registration fails."""

from __future__ import annotations

from typing import Any

import pytest
from coretests_support import MakeBackend

from pyvmm.capabilities import Capability
from pyvmm.devices.base import Device, Doorbell
from pyvmm.errors import HypervisorError
from pyvmm.machine.bus import MmioBus, PortBus
from pyvmm.machine.doorbells import Doorbells


class Queue(Device):
    name = "queue"
    doorbells = (Doorbell(0x10, 4), Doorbell(0x14, 2, datamatch=7))


def _buses() -> tuple[PortBus, MmioBus]:
    pio, mmio = PortBus(), MmioBus()
    mmio.register(0xD000_0000, 0x100, Queue())
    pio.register(0x500, 0x20, Queue())
    return pio, mmio


def _no_error(exc: BaseException) -> None:
    raise AssertionError(exc)


def test_nothing_without_ioevents(make_backend: MakeBackend) -> None:
    _, backend = make_backend(())
    with backend.create_vm() as vm:
        assert not Doorbells(vm, *_buses(), _no_error).register()


def test_ports_only_with_pio_ioevents(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend((Capability.IOEVENTS,))
    with backend.create_vm() as vm:
        doorbells = Doorbells(vm, *_buses(), _no_error)
        assert doorbells.register()
        calls = test_backend.calls_of("pyvmm_register_ioevent")
        assert [(c[2].space.value, c[2].address, c[3], c[4]) for c in calls] == [
            ("mmio", 0xD000_0010, None, 4),
            ("mmio", 0xD000_0014, 7, 2),
        ]
        doorbells.start()
        doorbells.close()
        assert len(test_backend.calls_of("pyvmm_unregister_ioevent")) == 2
        assert all(call[1].closed for call in calls), "every event is closed"


def test_a_refused_registration_undoes_the_others(make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    test_backend, backend = make_backend((Capability.IOEVENTS, Capability.PIO_IOEVENTS))
    with backend.create_vm() as vm:
        made: list[Any] = []
        real = vm.register_ioevent

        def second_refused(event: Any, address: Any, datamatch: int | None = None, length: int = 0) -> None:
            made.append(event)
            if len(made) == 2:
                raise HypervisorError("KVM_IOEVENTFD", 17)
            real(event, address, datamatch, length)

        monkeypatch.setattr(vm, "register_ioevent", second_refused)
        doorbells = Doorbells(vm, *_buses(), _no_error)
        with pytest.raises(HypervisorError):
            doorbells.register()
        assert doorbells.bells == []
        assert len(test_backend.calls_of("pyvmm_unregister_ioevent")) == 1
        assert all(event.closed for event in made)
