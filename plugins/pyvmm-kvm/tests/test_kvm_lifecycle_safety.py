"""Lifecycle safety on real KVM: the reproductions of issue 10 (kicks, close while
running, dropped VMs), each of which crashed, corrupted host memory, leaked or
raised an untyped error before the backend kit's thread rules."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import threading
import time
import warnings
import weakref
from typing import Any

import pytest

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.errors import VmStateError
from pyvmm.exits import ExitKind
from pyvmm.served_io import LatchedBytes
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import booted
from pyvmm.vcpu_state import IoEventAddress
from pyvmm.vm import Backend, Vm

#: ``1: inc qword ptr [0x1000]; jmp 1b`` -- a guest that writes RAM for ever.
WRITE_LOOP = bytes.fromhex("48ff042500100000ebf6")
COUNTER = 0x1000

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FIXED_NOREPLACE = 0x100000


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_for(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


def test_kick_after_the_creating_thread_has_exited_does_not_crash(kvm: Backend) -> None:
    """Reproduction 1: pthread_kill was handed a dead thread's id (segfault)."""
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        made: list[object] = []
        creator = threading.Thread(target=lambda: made.append(vm.create_vcpu()))
        creator.start()
        creator.join()
        for _ in range(8):  # let other threads reuse its stack, and perhaps its id
            other = threading.Thread(target=time.sleep, args=(0.001,))
            other.start()
            other.join()
        vcpu = made[0]
        vcpu.kick()  # type: ignore[attr-defined]
        vcpu.kick()  # type: ignore[attr-defined]


def test_close_while_a_vcpu_runs_waits_and_writes_no_host_memory_afterwards(kvm: Backend) -> None:
    """Reproduction 2: close() unmapped guest RAM under a running vCPU, whose guest
    then wrote into new host memory mapped at the same address."""
    vm = kvm.create_vm({"arch": "x86_64"})
    region = vm.add_memory(0, p.RAM_SIZE)
    vm.memory.write(p.CODE_ADDRESS, WRITE_LOOP)
    errors: list[BaseException] = []
    ready = threading.Event()

    def vcpu_thread() -> None:
        vcpu = vm.create_vcpu()
        vm.boot(BootSpec(arch="x86_64", entry=p.CODE_ADDRESS, stack=p.STACK_TOP, x86_mode=X86Mode.LONG))
        ready.set()
        try:
            while True:
                vcpu.run()
        except BaseException as exc:  # noqa: BLE001 - the test inspects what ended the loop
            errors.append(exc)

    worker = threading.Thread(target=vcpu_thread)
    worker.start()
    assert ready.wait(10)
    assert _wait_for(lambda: vm.memory.read_u64(COUNTER) > 0), "the guest never ran"
    address, size = region.host_addr, region.size
    vm.close()
    worker.join(10)
    assert not worker.is_alive(), "the vCPU thread must leave once the VM is closed"
    assert len(errors) == 1 and isinstance(errors[0], VmStateError), errors
    # Take the freed address range for ourselves; a guest still running would
    # keep incrementing the counter in it.
    fresh = libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)  # fmt: skip
    if fresh in (None, ctypes.c_void_p(-1).value) or fresh != address:
        pytest.skip("the freed range was taken by another mapping; cannot watch it")
    try:
        time.sleep(0.1)
        assert ctypes.string_at(address + COUNTER, 8) == bytes(8), "a closed VM wrote host memory"
    finally:
        libc.munmap(fresh, size)


def test_a_vcpu_run_on_another_thread_can_be_kicked(kvm: Backend) -> None:
    """Reproduction 6: a vCPU run on a thread other than its creator could not be kicked."""
    with booted(kvm, p.SPIN) as (_, vcpu):
        result: list[ExitKind] = []
        worker = threading.Thread(target=lambda: result.append(vcpu.run().kind))
        worker.start()
        time.sleep(0.05)
        vcpu.kick()
        worker.join(10)
        assert not worker.is_alive() and result == [ExitKind.INTERRUPTED]


def test_a_kick_flood_neither_fails_nor_starves_the_vcpu(kvm: Backend) -> None:
    """Reproduction 6: uncoalesced kicks filled the signal queue (BlockingIOError)
    and livelocked the vCPU thread."""
    with booted(kvm, p.SPIN) as (_, vcpu):
        stop = threading.Event()
        failures: list[BaseException] = []

        def flood() -> None:
            try:
                while not stop.is_set():
                    for _ in range(1000):
                        vcpu.kick()
            except BaseException as exc:  # noqa: BLE001
                failures.append(exc)

        flooders = [threading.Thread(target=flood) for _ in range(2)]
        for thread in flooders:
            thread.start()
        try:
            kinds = [vcpu.run().kind for _ in range(200)]
        finally:
            stop.set()
            for thread in flooders:
                thread.join()
        assert failures == []
        assert set(kinds) == {ExitKind.INTERRUPTED}


def test_kick_racing_close_is_never_an_untyped_error(kvm: Backend) -> None:
    """Reproduction 6: kick() racing close() raised ValueError (a released run page)."""
    for _ in range(20):
        vm = kvm.create_vm({"arch": "x86_64"})
        vcpu = vm.create_vcpu()
        raised: list[BaseException] = []
        kicking = threading.Event()

        def kicker(vcpu: Any = vcpu, raised: list[BaseException] = raised, kicking: Any = kicking) -> None:
            for n in range(200):
                if n == 1:
                    kicking.set()  # one kick has landed: now close races the rest
                try:
                    vcpu.kick()
                except VmStateError:
                    return  # closed: the typed answer
                except BaseException as exc:  # noqa: BLE001
                    raised.append(exc)
                    return

        thread = threading.Thread(target=kicker)
        thread.start()
        assert kicking.wait(10), "the kicker never got going"
        vm.close()
        thread.join()
        assert raised == []


def test_a_dropped_vm_warns_and_releases_its_descriptors(kvm: Backend) -> None:
    """Reproduction 5: a VM dropped without close() kept its fds, silently."""
    gc.collect()
    before = _fds()

    def make() -> None:
        vm: Vm = kvm.create_vm({"arch": "x86_64"})
        vm.add_memory(0, 0x10000)
        vm.create_vcpu()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) and "was not closed" in str(w.message) for w in caught)
    assert _fds() == before


def test_ctrl_c_during_close_still_finishes_it(kvm: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reproduction 5: a second Ctrl-C interrupted close() half-way, and it could not be retried."""
    gc.collect()
    before = _fds()
    vm = kvm.create_vm({"arch": "x86_64"})
    region = vm.add_memory(0, 0x10000)
    vcpu = vm.create_vcpu()
    real_close = type(vcpu.handle).close

    def interrupted_close(handle: object) -> None:
        real_close(handle)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(type(vcpu.handle), "close", interrupted_close)
    with pytest.raises(KeyboardInterrupt):
        vm.close()
    assert region.closed, "teardown went on after the interrupt"
    assert _fds() == before


@pytest.mark.parametrize("cpuid", ["host", "none"])
def test_a_closed_vm_is_freed_by_refcounting_alone(kvm: Backend, cpuid: str) -> None:
    """No reference cycle survives close: with the cyclic GC off, the VM, its
    backend handles and its vCPU go as soon as the last reference does, and a
    collection afterwards finds nothing of theirs."""
    gc.collect()
    gc.disable()
    try:
        vm: Vm = kvm.create_vm({"arch": "x86_64", "backend_options": {"cpuid": cpuid}})
        vm.add_memory(0, 0x10000)
        vcpu = vm.create_vcpu()
        vm.serve_io(IoEventAddress.pio(0x40), 1, LatchedBytes())  # the served ranges refer back to the VM
        handle = vcpu.handle
        refs = [weakref.ref(obj) for obj in (vm, vm.handle, vcpu, handle)]
        vm.close()
        with pytest.raises(VmStateError):
            handle.run()  # the handle's run after close: refused, without the vCPU behind it
        del vm, vcpu, handle
        assert [ref() for ref in refs] == [None] * len(refs)
        assert gc.collect() == 0
    finally:
        gc.enable()
