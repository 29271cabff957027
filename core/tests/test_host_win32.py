"""The Windows side of pyvmm.host, run here against a fake kernel32.

``ctypes.WinDLL`` and ``ctypes.get_last_error`` (which exist only on Windows) are
replaced by a fake whose functions behave as the Microsoft Learn pages describe
them ("VirtualAlloc function", "VirtualFree function", "CreateEventW function",
"SetEvent function", "ResetEvent function", "WaitForSingleObject function",
"CloseHandle function"), so the logic above the DLL (argument conventions, error
paths, lifetimes, the close rules) runs on this Linux host.  The fake's memory is
real (an mmap per allocation), so views and ``host_addr`` are exercised too.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvmm.config import MemoryRegionSpec
from pyvmm.errors import ConfigError, ErrorSpace, GuestMemoryError, HypervisorError, VmStateError
from pyvmm.host import Event, Win32Event, allocate_ram, default_event_class, win32
from pyvmm.memory import GuestMemory

ERROR_INVALID_HANDLE = 6
ERROR_NOT_ENOUGH_MEMORY = 8
ERROR_INVALID_PARAMETER = 87


class FakeFunction:
    """A ctypes foreign function stand-in: settable argtypes/restype, records calls."""

    def __init__(self, dll: FakeKernel32, name: str, body: Callable[..., Any]) -> None:
        self.dll = dll
        self.name = name
        self.body = body
        self.argtypes: list[Any] | None = None
        self.restype: Any = ctypes.c_int

    def __call__(self, *args: Any) -> Any:
        assert self.argtypes is not None and len(args) == len(self.argtypes), f"{self.name}: argtypes not declared"
        with self.dll.lock:
            self.dll.calls.append((self.name, args))
        return self.body(*args)


class FakeKernel32:
    """The kernel32 functions pyvmm.host calls, with Windows' documented behaviour."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.allocations: dict[int, mmap.mmap] = {}
        self.events: dict[int, bool] = {}  # handle -> signalled
        self.manual_reset: dict[int, bool] = {}
        self.next_handle = 0x100
        self.fail_next: dict[str, int] = {}  # function -> Win32 error it fails with once
        self.wait_result: int | None = None  # forced WaitForSingleObject result
        self.in_wait = 0
        self.last_error = 0
        self.thread_errors = threading.local()
        for name in ("VirtualAlloc", "VirtualFree", "CreateEventW", "SetEvent", "ResetEvent", "CloseHandle"):
            setattr(self, name, FakeFunction(self, name, getattr(self, f"_{name}")))
        self.WaitForSingleObject = FakeFunction(self, "WaitForSingleObject", self._WaitForSingleObject)

    def _error(self, code: int) -> None:
        self.thread_errors.value = code  # GetLastError is per thread

    def _failing(self, name: str) -> bool:
        code = self.fail_next.pop(name, None)
        if code is None:
            return False
        self._error(code)
        return True

    def calls_of(self, name: str) -> list[tuple[Any, ...]]:
        return [args for call, args in self.calls if call == name]

    # memoryapi.h
    def _VirtualAlloc(self, address: int | None, size: int, allocation_type: int, protect: int) -> int | None:
        if self._failing("VirtualAlloc"):
            return None
        if address is not None or allocation_type != win32.MEM_RESERVE | win32.MEM_COMMIT:
            self._error(ERROR_INVALID_PARAMETER)
            return None
        assert protect == win32.PAGE_READWRITE
        memory = mmap.mmap(-1, size)  # zero-filled, page-aligned, as committed pages are
        anchor = ctypes.c_char.from_buffer(memory)
        base = ctypes.addressof(anchor)
        del anchor
        self.allocations[base] = memory
        return base

    def _VirtualFree(self, address: int, size: int, free_type: int) -> int:
        # "If dwFreeType is MEM_RELEASE, dwSize must be 0" and address the base.
        if free_type != win32.MEM_RELEASE or size != 0 or address not in self.allocations:
            self._error(ERROR_INVALID_PARAMETER)
            return 0
        self.allocations.pop(address).close()
        return 1

    # synchapi.h / handleapi.h
    def _CreateEventW(self, attributes: Any, manual_reset: int, initial_state: int, name: Any) -> int | None:
        if self._failing("CreateEventW"):
            return None
        with self.lock:
            handle = self.next_handle
            self.next_handle += 4
            self.events[handle] = bool(initial_state)
            self.manual_reset[handle] = bool(manual_reset)
            return handle

    def _SetEvent(self, handle: int) -> int:
        with self.lock:
            if handle not in self.events:
                self._error(ERROR_INVALID_HANDLE)
                return 0
            self.events[handle] = True
            self.changed.notify_all()
            return 1

    def _ResetEvent(self, handle: int) -> int:
        with self.lock:
            if handle not in self.events:
                self._error(ERROR_INVALID_HANDLE)
                return 0
            self.events[handle] = False
            return 1

    def _WaitForSingleObject(self, handle: int, milliseconds: int) -> int:
        with self.lock:
            if self.wait_result is not None:
                if self.wait_result == win32.WAIT_FAILED:
                    self._error(ERROR_INVALID_HANDLE)
                return self.wait_result
            deadline = None if milliseconds == win32.INFINITE else time.monotonic() + milliseconds / 1000
            self.in_wait += 1
            try:
                while True:
                    if handle not in self.events:
                        # A handle closed during a wait: undefined on Windows. pyvmm must never do it.
                        raise AssertionError("CloseHandle while a thread waits on the handle")
                    if self.events[handle]:
                        if not self.manual_reset[handle]:
                            self.events[handle] = False
                        return win32.WAIT_OBJECT_0
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return win32.WAIT_TIMEOUT
                    self.changed.wait(remaining)
            finally:
                self.in_wait -= 1

    def _CloseHandle(self, handle: int) -> int:
        with self.lock:
            if handle not in self.events:
                self._error(ERROR_INVALID_HANDLE)
                return 0
            assert self.in_wait == 0, "CloseHandle while a thread waits on the handle"
            del self.events[handle]
            return 1


@pytest.fixture
def kernel32(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel32]:
    fake = FakeKernel32()
    loads: list[tuple[str, bool]] = []

    def win_dll(name: str, use_last_error: bool = False) -> FakeKernel32:
        loads.append((name, use_last_error))
        return fake

    monkeypatch.setattr(ctypes, "WinDLL", win_dll, raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: getattr(fake.thread_errors, "value", 0), raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    win32.reset()
    yield fake
    win32.reset()
    # ctypes must save GetLastError: loaded with use_last_error=True, once.
    assert loads in ([], [("kernel32", True)])


def test_kernel32_gets_its_signatures_declared(kernel32: FakeKernel32) -> None:
    dll = win32.kernel32()
    assert dll is kernel32
    assert win32.kernel32() is dll  # loaded once
    assert kernel32.VirtualAlloc.restype is ctypes.c_void_p  # a pointer, not a truncated int
    assert kernel32.CreateEventW.restype is ctypes.c_void_p  # a HANDLE
    assert kernel32.WaitForSingleObject.restype is ctypes.c_uint32  # a DWORD: WAIT_FAILED is 0xFFFFFFFF
    assert kernel32.VirtualFree.argtypes == [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32]


# --- allocate_ram: VirtualAlloc / VirtualFree ---------------------------------------------


def test_allocate_ram_commits_read_write_memory(kernel32: FakeKernel32) -> None:
    ram = allocate_ram(3 * 4096)
    [(address, size, allocation_type, protect)] = kernel32.calls_of("VirtualAlloc")
    assert (address, size, allocation_type, protect) == (None, 3 * 4096, 0x3000, 0x04)
    assert ram.address in kernel32.allocations
    assert ram.address % 4096 == 0
    assert ram.buffer.nbytes == 3 * 4096
    assert ram.buffer.format == "B"
    assert not ram.buffer.readonly
    assert bytes(ram.buffer) == bytes(3 * 4096)
    ram.buffer[4096:4100] = b"abcd"
    assert ctypes.string_at(ram.address + 4096, 4) == b"abcd"  # the address is the memory
    ram.close()
    assert kernel32.calls_of("VirtualFree") == [(ram.address, 0, win32.MEM_RELEASE)]
    assert kernel32.allocations == {}
    ram.close()  # idempotent: no second VirtualFree
    assert len(kernel32.calls_of("VirtualFree")) == 1
    with pytest.raises(VmStateError, match="released"):
        _ = ram.buffer


def test_a_live_view_defers_virtual_free(kernel32: FakeKernel32) -> None:
    ram = allocate_ram(4096)
    view = ram.buffer[16:32]
    view[:5] = b"hello"
    ram.close()
    assert ram.closed
    assert kernel32.calls_of("VirtualFree") == []  # never freed under a live view
    assert view[:5].tobytes() == b"hello"
    del view
    gc.collect()
    assert len(kernel32.calls_of("VirtualFree")) == 1
    assert kernel32.allocations == {}


def test_virtual_alloc_failure_is_a_win32_hypervisor_error(kernel32: FakeKernel32) -> None:
    kernel32.fail_next["VirtualAlloc"] = ERROR_NOT_ENOUGH_MEMORY
    with pytest.raises(HypervisorError) as info:
        allocate_ram(1 << 20)
    error = info.value
    assert (error.operation, error.space, error.code, error.winerror) == (
        "VirtualAlloc",
        ErrorSpace.WIN32,
        ERROR_NOT_ENOUGH_MEMORY,
        ERROR_NOT_ENOUGH_MEMORY,
    )
    assert error.code_name == "ERROR_NOT_ENOUGH_MEMORY"
    assert "0x100000 bytes" in str(error)
    assert isinstance(error, OSError)


def test_guest_memory_on_windows(kernel32: FakeKernel32) -> None:
    memory = GuestMemory()
    region = memory.allocate(MemoryRegionSpec(guest_phys_addr=0x10000, size=0x2000))
    memory.insert(region)
    assert region.host_addr in kernel32.allocations
    memory.write_u32(0x10FF0, 0xDEADBEEF)
    assert ctypes.string_at(region.host_addr + 0xFF0, 4) == (0xDEADBEEF).to_bytes(4, "little")
    kernel32.fail_next["VirtualAlloc"] = ERROR_NOT_ENOUGH_MEMORY
    with pytest.raises(GuestMemoryError, match="cannot reserve 0x1000 bytes"):
        memory.allocate(MemoryRegionSpec(guest_phys_addr=0x40000, size=0x1000))
    memory.close()
    assert kernel32.allocations == {}


def test_size_is_checked_before_any_call(kernel32: FakeKernel32) -> None:
    for size in (0, -4096, True, 4096.0):
        with pytest.raises(ConfigError, match="size must be a positive integer"):
            allocate_ram(size)  # type: ignore[arg-type]
    assert kernel32.calls == []


# --- Event: CreateEventW / SetEvent / ResetEvent / WaitForSingleObject / CloseHandle -------


def test_event_picks_a_windows_event(kernel32: FakeKernel32) -> None:
    assert default_event_class() is Win32Event
    with Event() as event:
        assert isinstance(event, Win32Event)
        [(attributes, manual_reset, initial, name)] = kernel32.calls_of("CreateEventW")
        assert (attributes, manual_reset, initial, name) == (None, True, False, None)
        assert event.handle in kernel32.events
        with pytest.raises(OSError, match="no file descriptor"):
            event.fileno()


def test_windows_event_signal_consume_wait(kernel32: FakeKernel32) -> None:
    event = Win32Event()
    assert event.consume() == 0
    assert event.wait(0) is False
    event.signal()
    event.set()  # an event object is a flag: signals coalesce
    assert event.wait(0) is True
    assert event.wait(0) is True  # waiting does not consume (manual reset)
    assert event.read() == 1
    assert event.consume() == 0
    assert kernel32.calls_of("ResetEvent") == [(event.handle,)]
    event.close()
    assert kernel32.calls_of("CloseHandle") != []
    event.close()  # idempotent
    assert len(kernel32.calls_of("CloseHandle")) == 1
    for call in (event.signal, event.consume, lambda: event.wait(0), lambda: event.handle):
        with pytest.raises(VmStateError, match="closed"):
            call()


@pytest.mark.parametrize(
    ("timeout", "milliseconds"),
    [(None, win32.INFINITE), (0, 0), (-1, 0), (0.0001, 1), (0.0015, 2), (2.0, 2000), (float("inf"), win32.INFINITE)],
)
def test_wait_timeouts_in_milliseconds(kernel32: FakeKernel32, timeout: float | None, milliseconds: int) -> None:
    with Win32Event() as event:
        kernel32.wait_result = win32.WAIT_TIMEOUT
        assert event.wait(timeout) is False
        assert kernel32.calls_of("WaitForSingleObject")[-1] == (event.handle, milliseconds)


def test_a_wait_is_woken_by_another_thread(kernel32: FakeKernel32) -> None:
    with Win32Event() as event:
        threading.Timer(0.05, event.signal).start()
        assert event.wait(10) is True


def test_close_wakes_a_waiter_and_closes_the_handle_after_it_left(kernel32: FakeKernel32) -> None:
    event = Win32Event()
    outcome: list[BaseException | bool] = []

    def waiter() -> None:
        try:
            outcome.append(event.wait())
        except BaseException as exc:  # noqa: BLE001 - the test asserts on what the thread raised
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    deadline = time.monotonic() + 10
    while kernel32.in_wait == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    event.close()  # the fake asserts no CloseHandle happens during a wait
    thread.join(10)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], VmStateError)
    assert len(kernel32.calls_of("CloseHandle")) == 1
    assert kernel32.events == {}


def test_windows_event_failures(kernel32: FakeKernel32) -> None:
    kernel32.fail_next["CreateEventW"] = ERROR_NOT_ENOUGH_MEMORY
    with pytest.raises(HypervisorError, match=r"CreateEventW failed: \[ERROR_NOT_ENOUGH_MEMORY\]"):
        Win32Event()
    event = Win32Event()
    kernel32.wait_result = win32.WAIT_FAILED
    with pytest.raises(HypervisorError, match=r"WaitForSingleObject failed: \[ERROR_INVALID_HANDLE\]") as info:
        event.wait(1)
    assert info.value.winerror == ERROR_INVALID_HANDLE
    kernel32.wait_result = win32.WAIT_ABANDONED  # mutexes only: never for an event
    with pytest.raises(HypervisorError, match="unexpected result 0x80"):
        event.consume()
    kernel32.wait_result = None
    kernel32.events.pop(event.handle)  # the handle went bad underneath
    with pytest.raises(HypervisorError, match=r"SetEvent failed: \[ERROR_INVALID_HANDLE\]"):
        event.signal()
    with pytest.raises(HypervisorError, match="CloseHandle failed"):
        event.close()
