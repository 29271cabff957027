"""The backend kit: ioctl encodings, the host and its switch, the run page, the
kicker's thread rules and the DLL seam."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from typing import Any

import pytest

from pyvmm.backend import (
    DeviceHost,
    DllFunction,
    DllHost,
    HostSwitch,
    IoctlRequest,
    LibcDeviceSeam,
    LoadedDll,
    RunPage,
    SignalKicker,
    bsd,
    ctl_code,
    install_kick_handler,
    kick_signal,
    linux,
    request_names,
)
from pyvmm.backend import kick as kick_module
from pyvmm.errors import ErrorSpace, HypervisorError, VmStateError

# --- ioctl encodings ----------------------------------------------------------------


def test_linux_encoding_matches_the_kernel_numbers() -> None:
    # Numbers as <linux/kvm.h> and <linux/gunyah.h> define them (checked against
    # the system header by pyvmm-kvm's layout test).
    assert linux.io(0xAE, 0x80) == 0xAE80  # KVM_RUN
    assert linux.io(0xAE, 0x04) == 0xAE04  # KVM_GET_VCPU_MMAP_SIZE
    assert linux.iow(0xAE, 0x46, 32) == 0x4020AE46  # KVM_SET_USER_MEMORY_REGION
    assert linux.ior(0xAE, 0x81, 144) == 0x8090AE81  # KVM_GET_REGS
    assert linux.iowr(0xAE, 0x05, 8) == 0xC008AE05  # KVM_GET_SUPPORTED_CPUID


def test_bsd_encoding() -> None:
    # sys/ioccom.h: TIOCFLUSH is _IOW('t', 16, int) = 0x80047410 on macOS and the BSDs.
    assert bsd.iow(ord("t"), 16, 4) == 0x80047410
    assert bsd.io(ord("t"), 113) == 0x20007471  # TIOCEXCL, _IO('t', 113)
    assert bsd.ior(ord("t"), 19, 44) == 0x402C7413  # TIOCGETA on 64-bit macOS: _IOR('t', 19, struct termios)
    assert bsd.iowr(ord("H"), 1, 8) == 0xC0084801


def test_windows_ctl_code() -> None:
    # winioctl.h: IOCTL_DISK_GET_DRIVE_GEOMETRY = CTL_CODE(FILE_DEVICE_DISK=7, 0, METHOD_BUFFERED, FILE_ANY_ACCESS)
    assert ctl_code(0x7, 0x0, 0, 0) == 0x70000
    # IOCTL_DISK_GET_PARTITION_INFO = CTL_CODE(7, 1, METHOD_BUFFERED, FILE_READ_ACCESS)
    assert ctl_code(0x7, 0x1, 0, 1) == 0x74004
    # HAXM's HAX_IOCTL_VERSION: CTL_CODE(0x4000, 0x900, METHOD_BUFFERED, FILE_ANY_ACCESS)
    assert ctl_code(0x4000, 0x900) == 0x40002400


@pytest.mark.parametrize(
    ("encode", "message"),
    [
        (lambda: linux.iow(0xAE, 1, 1 << 14), "size"),
        (lambda: linux.io(0x100, 1), "type"),
        (lambda: linux.io(0xAE, 0x100), "number"),
        (lambda: bsd.iow(1, 1, 0x2000), "13 bits"),
        (lambda: ctl_code(0x10000, 1), "device type"),
        (lambda: ctl_code(1, 0x1000), "function"),
    ],
)
def test_encodings_refuse_fields_that_do_not_fit(encode: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode()


def test_request_names_come_from_the_assignments() -> None:
    namespace = {
        "FOO_RUN": linux.io(0xAE, 0x80),
        "FOO_OTHER": linux.io(0xAE, 0x81),
        "FOO_EXIT_IO": 2,  # a plain constant is not a request
        "_private": linux.io(0xAE, 0x82),
    }
    assert request_names(namespace) == {0xAE80: "FOO_RUN", 0xAE81: "FOO_OTHER"}
    assert isinstance(namespace["FOO_RUN"], IoctlRequest)


def test_request_names_refuse_two_names_for_one_number() -> None:
    with pytest.raises(ValueError, match="share the number 0xae80"):
        request_names({"A": linux.io(0xAE, 0x80), "B": linux.io(0xAE, 0x80)})


# --- the host and its switch --------------------------------------------------------


class RecordingSeam:
    """A DeviceSeam that answers every ioctl with a fixed result and logs calls."""

    def __init__(self, result: int = 0) -> None:
        self.result = result
        self.calls: list[tuple[str, Any]] = []

    def open(self, path: str, flags: int) -> int:
        self.calls.append(("open", path))
        return -errno.ENOENT

    def close(self, fd: int) -> int:
        self.calls.append(("close", fd))
        return 0

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        self.calls.append(("ioctl", (fd, request, arg)))
        return self.result

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        raise OSError(errno.ENODEV, "no")

    def signal_thread(self, thread_id: int, signum: int) -> None:
        self.calls.append(("signal", (thread_id, signum)))


NAMES = {0xAE80: "FOO_RUN"}


def test_device_host_names_the_failing_ioctl() -> None:
    host = DeviceHost(RecordingSeam(result=-errno.EBADF), NAMES)
    with pytest.raises(HypervisorError) as info:
        host.ioctl(5, 0xAE80, 7)
    assert info.value.operation == "FOO_RUN" and info.value.errno == errno.EBADF
    with pytest.raises(HypervisorError, match=r"ioctl 0x1234"):
        host.ioctl(5, 0x1234)
    assert host.try_ioctl(5, 0xAE80) == -errno.EBADF


def test_device_host_passes_cffi_pointers_by_address() -> None:
    import cffi

    ffi = cffi.FFI()
    seam = RecordingSeam()
    host = DeviceHost(seam, NAMES)
    value = ffi.new("uint64_t *", 3)
    host.ioctl(5, 0xAE80, value)
    assert seam.calls[-1] == ("ioctl", (5, 0xAE80, int(ffi.cast("uintptr_t", value))))


def test_device_host_open_and_mmap_errors_are_typed() -> None:
    host = DeviceHost(RecordingSeam(), NAMES)
    with pytest.raises(HypervisorError, match=r"open\(/dev/nothing\)") as info:
        host.open_device("/dev/nothing")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(HypervisorError, match=r"mmap\(run page\)"):
        host.map_shared(3, 4096, "run page")


def test_host_switch_routes_new_objects_and_restores() -> None:
    switch = HostSwitch("foo", RecordingSeam, NAMES)
    real = switch.current()
    assert switch.current() is real, "one host per switch until switched"
    model = RecordingSeam()
    with switch.use(model) as host:
        assert switch.current() is host and host.seam is model
    assert switch.current() is real


def test_libc_seam_returns_negative_errno() -> None:
    seam = LibcDeviceSeam()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert seam.ioctl(w, 0xAE80, 0) == -errno.EBADF
    assert seam.close(w) == -errno.EBADF
    assert seam.open("/nonexistent/pyvmm", os.O_RDONLY) == -errno.ENOENT


# --- the run page -----------------------------------------------------------------


def test_run_page_views_and_release() -> None:
    page = RunPage(mmap.mmap(-1, 4096), immediate_exit=1, mmio_data=32)
    page.request_immediate_exit()
    assert page.immediate_exit_requested and page.view[1] == 1
    page.clear_immediate_exit()
    assert not page.immediate_exit_requested
    page.mmio_views[4][:] = b"\x01\x02\x03\x04"
    assert bytes(page.view[32:36]) == b"\x01\x02\x03\x04"
    held = page.mmio_views[8]  # a caller still holding an exit's data
    page.release()
    page.release()  # idempotent
    assert page.closed
    held[0] = 9  # the mapping lives on under the caller's view, never dangling
    assert held[0] == 9


# --- the kicker -------------------------------------------------------------------


@pytest.fixture
def handler() -> None:
    if not install_kick_handler():
        pytest.skip("the kick handler can only be installed from the main thread")


class Signals:
    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []
        self.exits = 0

    def request_exit(self) -> None:
        self.exits += 1

    def send(self, thread: int, signum: int) -> None:
        self.sent.append((thread, signum))


def test_kicks_are_coalesced_until_acknowledged(handler: None) -> None:
    signals = Signals()
    kicker = SignalKicker(signals.request_exit, signals.send, "test")
    ready, done = threading.Event(), threading.Event()

    def vcpu_thread() -> None:
        kicker.bind()
        ready.set()
        done.wait(5)

    worker = threading.Thread(target=vcpu_thread)
    worker.start()
    ready.wait(5)
    for _ in range(1000):
        kicker.kick()
    assert signals.exits == 1000, "every kick sets immediate_exit"
    assert signals.sent == [(worker.ident, kick_signal())], "but only one signal is in flight"
    kicker.acknowledge()
    kicker.kick()
    assert len(signals.sent) == 2
    done.set()
    worker.join()


def test_a_kick_never_signals_a_dead_thread(handler: None) -> None:
    signals = Signals()
    holder: list[SignalKicker] = []
    creator = threading.Thread(target=lambda: holder.append(SignalKicker(signals.request_exit, signals.send, "t")))
    creator.start()
    creator.join()
    # Reuse the dead thread's stack (and possibly its id) as the reproduction did.
    for _ in range(4):
        other = threading.Thread(target=time.sleep, args=(0.001,))
        other.start()
        other.join()
    kicker = holder[0]
    assert not kick_module.thread_alive(kicker.thread)
    kicker.kick()
    assert signals.exits == 1, "immediate_exit still covers the next run"
    assert signals.sent == [], "no signal to a thread that has exited"


def test_the_kick_follows_the_thread_that_runs_the_vcpu(handler: None) -> None:
    signals = Signals()
    kicker = SignalKicker(signals.request_exit, signals.send, "t")  # created here, on the main thread
    ready, done = threading.Event(), threading.Event()

    def runner() -> None:
        kicker.bind()  # what a backend's run() does on a new thread
        ready.set()
        done.wait(5)

    worker = threading.Thread(target=runner)
    worker.start()
    ready.wait(5)
    kicker.kick()
    assert signals.sent == [(worker.ident, kick_signal())]
    done.set()
    worker.join()


def test_a_kick_on_the_running_thread_itself_only_sets_immediate_exit(handler: None) -> None:
    signals = Signals()
    kicker = SignalKicker(signals.request_exit, signals.send, "t")
    kicker.kick()
    assert signals.exits == 1 and signals.sent == []


def test_a_kick_after_close_touches_nothing(handler: None) -> None:
    signals = Signals()
    kicker = SignalKicker(signals.request_exit, signals.send, "t")
    kicker.close()
    kicker.kick()
    assert signals.exits == 0 and signals.sent == []


def test_a_real_kick_interrupts_a_blocked_thread(handler: None) -> None:
    """End to end with pthread_kill: a thread blocked in a system call (as a vCPU
    thread is inside KVM_RUN) returns EINTR.  The raw libc read is used because
    Python retries its own calls after a signal (PEP 475)."""
    import signal

    r, w = os.pipe()
    interrupted = threading.Event()
    holder: list[SignalKicker] = []
    started = threading.Event()

    def blocked() -> None:
        holder.append(SignalKicker(lambda: None, signal.pthread_kill, "t"))
        started.set()
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(1)
        if libc.read(r, buf, 1) < 0 and ctypes.get_errno() == errno.EINTR:
            interrupted.set()

    worker = threading.Thread(target=blocked)
    worker.start()
    started.wait(5)
    time.sleep(0.05)
    holder[0].kick()
    worker.join(5)
    try:
        assert interrupted.is_set(), "the kick signal must interrupt the blocked read"
    finally:
        os.close(w)
        os.close(r)


def test_a_kick_without_the_handler_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kick_module, "_installed", False)
    signals = Signals()
    ready, done = threading.Event(), threading.Event()
    kicker = SignalKicker(signals.request_exit, signals.send, "acme")

    def runner() -> None:
        kicker.bind()
        ready.set()
        done.wait(5)

    worker = threading.Thread(target=runner)
    worker.start()
    ready.wait(5)
    try:
        with pytest.raises(VmStateError, match="acme vCPU"):
            kicker.kick()
        assert signals.sent == []
    finally:
        done.set()
        worker.join()


# --- the DLL seam -----------------------------------------------------------------


def test_loaded_dll_resolves_required_and_optional_exports() -> None:
    libc = ctypes.CDLL(None)
    dll = LoadedDll(
        libc,
        [
            DllFunction("getpid", ctypes.c_int),
            DllFunction("WHvQueryGpaRangeDirtyBitmap", ctypes.c_long, required=False),
        ],
    )
    assert dll.has("getpid") and not dll.has("WHvQueryGpaRangeDirtyBitmap")
    assert dll.missing_optional == ("WHvQueryGpaRangeDirtyBitmap",)
    assert dll.function("getpid")() == os.getpid()


def test_loaded_dll_refuses_a_missing_required_export() -> None:
    with pytest.raises(HypervisorError, match="WHvCreatePartition") as info:
        LoadedDll(ctypes.CDLL(None), [DllFunction("WHvCreatePartition", ctypes.c_long)])
    assert info.value.space is ErrorSpace.WIN32


class FakeDll:
    """A DllSeam the way a model provides one."""

    def __init__(self, functions: dict[str, Any], last_error: int = 0) -> None:
        self.functions = functions
        self.error = last_error

    def function(self, name: str) -> Any:
        return self.functions[name]

    def has(self, name: str) -> bool:
        return name in self.functions

    def last_error(self) -> int:
        return self.error


def test_dll_host_hresult_convention() -> None:
    host = DllHost(FakeDll({"WHvCreatePartition": lambda *a: -2147024809, "WHvSetupPartition": lambda *a: 0}))
    assert host.call_hresult("WHvSetupPartition", 1) == 0
    with pytest.raises(HypervisorError) as info:
        host.call_hresult("WHvCreatePartition", 1)
    assert info.value.operation == "WHvCreatePartition"
    assert info.value.space is ErrorSpace.HRESULT and info.value.code == 0x80070057  # E_INVALIDARG


def test_dll_host_bool_convention_reads_the_last_error() -> None:
    host = DllHost(FakeDll({"DeviceIoControl": lambda *a: 0}, last_error=5))  # ERROR_ACCESS_DENIED
    with pytest.raises(HypervisorError) as info:
        host.call_bool("DeviceIoControl", 1)
    assert info.value.space is ErrorSpace.WIN32 and info.value.code == 5


def test_dll_host_optional_export_absent_is_a_typed_error() -> None:
    host = DllHost(FakeDll({}))
    assert not host.has("WHvQueryGpaRangeDirtyBitmap")
    with pytest.raises(VmStateError, match="WHvQueryGpaRangeDirtyBitmap"):
        host.call_hresult("WHvQueryGpaRangeDirtyBitmap")


# --- the run guard and close --------------------------------------------------------


class Interrupted:
    """Stands in for a backend's one InterruptedExit."""


def test_a_guarded_run_refuses_once_closed(handler: None) -> None:
    signals = Signals()
    kicker = SignalKicker(signals.request_exit, signals.send, "acme")
    interrupted = Interrupted()
    run = kicker.guard_run(lambda: "exit", interrupted)
    assert run() == "exit" and not kicker.running
    kicker.close()
    with pytest.raises(VmStateError, match="acme vCPU is closed"):
        run()
    assert not kicker.running


def test_close_kicks_a_running_vcpu_out_and_waits_for_it(handler: None) -> None:
    left = threading.Event()
    entered = threading.Event()
    interrupted = Interrupted()

    def blocked_run() -> object:
        entered.set()
        left.wait(5)  # "inside the hypervisor" until kicked
        return interrupted

    def send(thread: int, signum: int) -> None:
        left.set()  # the signal is what gets the vCPU out

    kicker = SignalKicker(lambda: None, send, "acme")
    run = kicker.guard_run(blocked_run, interrupted)
    worker = threading.Thread(target=run)
    worker.start()
    assert entered.wait(5)
    kicker.close()
    assert not kicker.running, "close returned only after the run left"
    worker.join(5)


def test_close_gives_a_typed_error_when_a_run_never_leaves(handler: None) -> None:
    release = threading.Event()
    entered = threading.Event()
    interrupted = Interrupted()

    def stuck_run() -> object:
        entered.set()
        release.wait(10)
        return interrupted

    kicker = SignalKicker(lambda: None, lambda t, s: None, "acme")
    worker = threading.Thread(target=kicker.guard_run(stuck_run, interrupted))
    worker.start()
    assert entered.wait(5)
    try:
        with pytest.raises(VmStateError, match="did not leave the hypervisor"):
            kicker.close(timeout=0.05)
    finally:
        release.set()
        worker.join(5)


def test_an_interruption_rearms_the_kick_signal(handler: None) -> None:
    signals = Signals()
    kicker = SignalKicker(signals.request_exit, signals.send, "t")
    interrupted = Interrupted()
    ready, go, done, finish = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    results: list[object] = []

    def runner() -> None:
        run = kicker.guard_run(lambda: interrupted, interrupted)
        kicker.bind()
        ready.set()
        go.wait(5)
        results.append(run())
        done.set()
        finish.wait(5)

    worker = threading.Thread(target=runner)
    worker.start()
    ready.wait(5)
    kicker.kick()
    kicker.kick()
    assert len(signals.sent) == 1, "coalesced while the first is in flight"
    go.set()
    done.wait(5)
    assert results == [interrupted]
    kicker.kick()
    finish.set()
    worker.join(5)
    assert len(signals.sent) == 2, "the interruption re-armed the signal"


def test_fast_ioctl_reports_the_errno_on_both_kinds_of_seam() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    call, errno_of = DeviceHost(LibcDeviceSeam(), NAMES).fast_ioctl()
    result = call(w, 0xAE80, 0)
    assert result < 0 and errno_of(result) == errno.EBADF
    call, errno_of = DeviceHost(RecordingSeam(result=-errno.EINTR), NAMES).fast_ioctl()
    result = call(3, 0xAE80, 0)
    assert result < 0 and errno_of(result) == errno.EINTR
