"""The driver-model harness (:mod:`pyvmm.testing.driver_model`) on toy models:
one test per feature the Gunyah, GenieZone, HAXM and WHPX models need -- call
dispatch and rules, syscall-return signal semantics, threads and per-object
locks, re-entrant call recording, EFAULT for unmapped user pointers, parsing what
the hypervisor reads, driver-mapped user pages, the DeviceIoControl seam and the
DLL seam (HRESULT, out-parameters, callbacks)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterator

import pytest

from pyvmm.backend.dll import DllHost
from pyvmm.errors import ErrorSpace, HypervisorError
from pyvmm.machine.devicetree import DeviceTree
from pyvmm.testing import driver_model as dm

RULE = dm.Rule("TOY-ARG", errno.EINVAL, "the toy's argument must be even", "this test")
ADVICE = dm.Rule("TOY-ADVICE", 0, "odd but accepted", "this test")
WRONG_THREAD = dm.Rule("TOY-THREAD", errno.EPERM, "only the creating thread", "this test")

TOY_IOCTL, TOY_SLOW, TOY_STRUCT, TOY_PAGES, TOY_INTERRUPTED = 0x1234, 0x1235, 0x1236, 0x1237, 0x1238


class ToyFile(dm.FileObject):
    kind = "toy"
    model: ToyDevice

    def __init__(self, model: dm.DeviceFileModel) -> None:
        super().__init__(model)
        self.done = 0
        self.lock = dm.ObjectMutex(model, "toy lock")
        self.inside = threading.Event()

    @dm.handles(TOY_IOCTL, "TOY_IOCTL")
    def toy(self, arg: int) -> int:
        return arg + 1

    @dm.handles(TOY_INTERRUPTED, "TOY_INTERRUPTED")
    def interrupted(self, arg: int) -> int:
        """Does its work, then finds a signal pending: ERESTARTSYS, work kept."""
        self.done += 1
        self.model.checkpoint("toy:done")
        return -dm.ERESTARTSYS if self.model.signal_pending() else 0

    @dm.handles(TOY_SLOW, "TOY_SLOW")
    def slow(self, arg: int) -> int:
        """Holds the toy lock until released or interrupted."""
        if not self.lock.acquire():
            return -dm.ERESTARTSYS
        try:
            self.inside.set()
            woke = self.model.sleep_until(lambda: self.model.released, "the test's release")
            return 0 if woke else -dm.ERESTARTSYS
        finally:
            self.lock.release()

    @dm.handles(TOY_STRUCT, "TOY_STRUCT")
    def toy_struct(self, arg: int) -> int:
        (value,) = struct.unpack("<Q", self.model.copy_from_user(arg, 8))
        self.model.copy_to_user(arg, struct.pack("<Q", value * 2))
        return 0

    @dm.handles(TOY_PAGES, "TOY_PAGES")
    def toy_pages(self, arg: int) -> int:
        return self.map_user_pages(dm.PAGE_SIZE, "toy tunnel").address


class ToyDevice(dm.DeviceFileModel):
    def __init__(self) -> None:
        super().__init__()
        self.devices["/dev/toy"] = ToyFile
        self.released = False


@pytest.fixture
def toy() -> Iterator[tuple[ToyDevice, int]]:
    model = ToyDevice()
    fd = model.open("/dev/toy", 0)
    yield model, fd
    model.close_all()


# --- dispatch, rules, the call log ---------------------------------------------------


def test_device_file_dispatch_and_fd_rules() -> None:
    toy = ToyDevice()
    fd = toy.open("/dev/toy", 0)
    try:
        assert toy.ioctl(fd, TOY_IOCTL, 41) == 42
        assert toy.ioctl(fd, 0x9999, 0) == -errno.ENOTTY
        assert toy.last_rejection is not None
        assert toy.last_rejection.rule is dm.NO_SUCH_IOCTL
        with pytest.raises(OSError) as caught:
            toy.mmap(fd, 4096, 0)
        assert caught.value.errno == errno.ENODEV
        assert toy.open("/dev/nothing", 0) == -errno.ENOENT
    finally:
        assert toy.close(fd) == 0
    assert toy.ioctl(fd, TOY_IOCTL, 0) == -errno.EBADF
    assert toy.close(fd) == -errno.EBADF
    assert [c.name for c in toy.calls][:2] == ["open", "TOY_IOCTL"]
    assert {c.thread for c in toy.calls} == {threading.get_ident()}


def test_rules_carry_their_code_space() -> None:
    assert "EINVAL" in str(RULE)
    win32 = dm.Rule("W", 87, "bad parameter", "this test", space=ErrorSpace.WIN32)
    assert "ERROR_INVALID_PARAMETER" in str(win32)
    hresult = dm.Rule("H", 0x80070057, "bad argument", "this test", space=ErrorSpace.HRESULT)
    assert "E_INVALIDARG" in str(hresult)
    assert dm.ModelCore().error_value(hresult) == 0x80070057 - (1 << 32)
    assert "advisory" in str(ADVICE)


# --- syscall-return signal semantics -----------------------------------------------------


def test_erestartsys_reaches_the_caller_as_eintr_with_the_work_kept(toy: tuple[ToyDevice, int]) -> None:
    model, fd = toy
    obj = model.files[fd]
    assert isinstance(obj, ToyFile)
    model.signal_at("toy:done")  # the signal arrives after the work, before the return
    assert model.ioctl(fd, TOY_INTERRUPTED, 0) == -errno.EINTR
    assert obj.done == 1  # the side effect stays
    assert not model.signal_pending()  # delivered on the way out
    (call,) = model.calls_named("TOY_INTERRUPTED")
    assert (call.errno, call.rule) == (errno.EINTR, None)  # protocol, not a broken rule


def test_sa_restart_makes_the_call_again(toy: tuple[ToyDevice, int]) -> None:
    model, fd = toy
    obj = model.files[fd]
    assert isinstance(obj, ToyFile)
    model.sa_restart = True
    model.signal_at("toy:done")
    assert model.ioctl(fd, TOY_INTERRUPTED, 0) == 0
    assert obj.done == 2  # the first attempt's work, then the restarted call's


def test_a_signal_is_delivered_when_the_call_returns(toy: tuple[ToyDevice, int]) -> None:
    model, fd = toy
    model.post_signal(threading.get_ident())
    assert model.signal_pending()
    assert model.ioctl(fd, TOY_IOCTL, 0) == 1  # the handler did not look; the signal still goes
    assert not model.signal_pending()


def test_sleep_wakes_on_a_signal_and_gives_up_after_the_limit() -> None:
    core = dm.ModelCore()
    core.sleep_limit = 0.2
    me = threading.get_ident()
    threading.Timer(0.05, core.post_signal, (me,)).start()
    assert core.sleep_until(lambda: False, "nothing") is False
    assert core.take_signal()
    with pytest.raises(dm.ModelGap, match="nothing would wake it"):
        core.sleep_until(lambda: False, "a doorbell")


# --- threads and per-object serialisation ---------------------------------------------


def test_an_object_mutex_makes_a_second_thread_wait_interruptibly(toy: tuple[ToyDevice, int]) -> None:
    model, fd = toy
    obj = model.files[fd]
    assert isinstance(obj, ToyFile)
    results: dict[str, int] = {}
    threads: dict[str, int] = {}

    def call(name: str) -> None:
        threads[name] = threading.get_ident()
        results[name] = model.ioctl(fd, TOY_SLOW, 0)

    first = threading.Thread(target=call, args=("first",))
    first.start()
    assert obj.inside.wait(5)
    second = threading.Thread(target=call, args=("second",))
    second.start()
    second.join(0.2)
    assert second.is_alive(), "the second caller must wait for the lock"
    assert obj.lock.holder == threads["first"]
    model.post_signal(threads["second"])  # interrupts the wait for the lock
    second.join(5)
    assert results["second"] == -errno.EINTR
    assert obj.lock.holder == threads["first"]
    model.released = True
    model.notify()
    first.join(5)
    assert results["first"] == 0
    assert obj.lock.holder is None
    by_thread = {c.thread for c in model.calls_named("TOY_SLOW")}
    assert by_thread == {threads["first"], threads["second"]}


def test_thread_affinity_refuses_other_threads() -> None:
    affinity = dm.ThreadAffinity("toy vCPU")
    affinity.check(WRONG_THREAD)  # the creator
    errors: list[BaseException] = []

    def other() -> None:
        try:
            affinity.check(WRONG_THREAD)
        except dm.RuleViolation as exc:
            errors.append(exc)

    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    (error,) = errors
    assert isinstance(error, dm.RuleViolation)
    assert error.rule is WRONG_THREAD


# --- user memory ------------------------------------------------------------------------


def test_copy_from_and_to_user_fault_on_unmapped_pointers(toy: tuple[ToyDevice, int]) -> None:
    model, fd = toy
    value = ctypes.c_uint64(21)
    assert model.ioctl(fd, TOY_STRUCT, ctypes.addressof(value)) == 0
    assert value.value == 42
    # A page that was mapped and is no longer: the handler faults, the process does not.
    gone = mmap.mmap(-1, dm.PAGE_SIZE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(gone))
    gone.close()
    for pointer in (0, 8, address, (1 << 47) + 0x1000, (1 << 64) - 4):
        assert model.ioctl(fd, TOY_STRUCT, pointer) == -errno.EFAULT, hex(pointer)
        assert model.last_rejection is not None
        assert model.last_rejection.rule is dm.EFAULT_RULE


def test_copy_to_user_faults_on_a_read_only_page() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    page = libc.mmap(None, dm.PAGE_SIZE, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    try:
        core = dm.ModelCore()
        assert core.copy_from_user(page, 8) == bytes(8)
        with pytest.raises(dm.RuleViolation) as caught:
            core.copy_to_user(page, b"x")
        assert caught.value.rule is dm.EFAULT_RULE
    finally:
        libc.munmap(page, dm.PAGE_SIZE)


# --- what the hypervisor reads --------------------------------------------------------


def test_the_hypervisor_reads_a_device_tree_through_the_hook() -> None:
    tree = DeviceTree()
    tree.string("/cpus/cpu@0", "device_type", "cpu")
    tree.u32("/cpus/cpu@0", "reg", 0)
    tree.string("/cpus/cpu@1", "device_type", "cpu")
    tree.string("/config/bell", "vdevice-type", "doorbell")
    tree.u32("/config/bell", "label", 0x21)
    blob = tree.to_dtb() + b"\xff" * 64  # the hypervisor reads a whole page
    core = dm.ModelCore()
    parsed = core.read_config("device tree", 0x8000_0000, blob, dm.parse_device_tree)
    assert isinstance(parsed, dm.DeviceTreeBlob)
    assert parsed.children("/cpus") == ["/cpus/cpu@0", "/cpus/cpu@1"]
    assert parsed.string("/cpus/cpu@1", "device_type") == "cpu"
    assert parsed.u32("/config/bell", "label") == 0x21
    assert parsed.u32("/config/bell", "missing") is None
    (read,) = core.configs
    assert (read.kind, read.address, read.parsed) == ("device tree", 0x8000_0000, parsed)
    with pytest.raises(dm.ConfigBlobError, match="magic"):
        core.read_config("device tree", 0, bytes(4096), dm.parse_device_tree)
    with pytest.raises(dm.ConfigBlobError, match="only"):
        dm.parse_device_tree(tree.to_dtb()[:64])


# --- driver-mapped user pages ------------------------------------------------------


def test_driver_mapped_pages_live_as_long_as_their_fd(toy: tuple[ToyDevice, int]) -> None:
    model, fd = toy
    address = model.ioctl(fd, TOY_PAGES, 0)
    ctypes.memmove(address, b"tunnel", 6)
    assert ctypes.string_at(address, 6) == b"tunnel"
    assert dm.user_address_mapped(address, dm.PAGE_SIZE)
    assert model.close(fd) == 0
    assert not dm.user_address_mapped(address)  # unmapped with the file


def test_holding_driver_pages_past_close_is_reported() -> None:
    model = ToyDevice()
    fd = model.open("/dev/toy", 0)
    model.ioctl(fd, TOY_PAGES, 0)
    obj = model.files[fd]
    (pages,) = obj.user_pages
    assert pages.mapping is not None
    view = memoryview(pages.mapping)
    model.close(fd)
    assert [r.rule for r in model.rejections] == [dm.PAGES_HELD]
    view.release()
    assert pages.unmap()


# --- the DLL seam: HRESULT, BOOL + last error, out-parameters, callbacks --------------------

E_INVALIDARG = dm.Rule("E_INVALIDARG", 0x80070057, "bad argument", "this test", space=ErrorSpace.HRESULT)
NOT_READY = dm.Rule("ERROR_NOT_READY", 21, "not ready", "this test", space=ErrorSpace.WIN32)


class ToyDll(dm.DllModel):
    """A DLL model: an HRESULT export with an out-parameter and a callback, a
    BOOL export with the last error, an export a callback calls back into."""

    missing = frozenset({"ToyNewer"})

    def __init__(self) -> None:
        super().__init__()
        self.ffi.cdef("typedef int32_t (*toy_callback)(void *context, uint32_t value);")

    @dm.exported("ToyCreate")
    def create(self, value: int, out: int) -> int:
        if value % 2:
            raise dm.RuleViolation(E_INVALIDARG, f"value {value}")
        if value == 4:
            self.advise(ADVICE, "four")
        self.write_out(out, "<Q", 0x1000 + value)
        return 0

    @dm.exported("ToyIsReady", "bool")
    def is_ready(self, ready: int) -> int:
        if not ready:
            raise dm.RuleViolation(NOT_READY)
        return 1

    @dm.exported("ToyEmulate")
    def emulate(self, callback: int, context: int) -> int:
        call = self.callback(callback, "toy_callback", "ToyIoPortCallback")
        return int(call(self.ffi.cast("void *", context), 7))

    @dm.exported("ToyQuery")
    def query(self, value: int) -> int:
        return value * 3

    @dm.exported("ToyNewer")
    def newer(self) -> int:
        return 0


def test_hresult_exports_return_the_rule_and_write_out_parameters() -> None:
    dll = ToyDll()
    host = DllHost(dll)
    out = ctypes.c_uint64()
    assert host.call_hresult("ToyCreate", 2, ctypes.addressof(out)) == 0
    assert out.value == 0x1002
    with pytest.raises(HypervisorError) as caught:
        host.call_hresult("ToyCreate", 3, ctypes.addressof(out))
    assert (caught.value.code, caught.value.space) == (0x80070057, ErrorSpace.HRESULT)
    assert dll.last_rejection is not None
    assert dll.last_rejection.rule is E_INVALIDARG
    with pytest.raises(HypervisorError) as bad_out:
        host.call_hresult("ToyCreate", 2, 8)  # an out-parameter nowhere
    assert bad_out.value.code == 0x80004003  # E_POINTER
    assert [(c.name, c.arg) for c in dll.calls] == [("ToyCreate", 2), ("ToyCreate", 3), ("ToyCreate", 2)]


def test_advisory_rule_lets_the_call_through_but_is_recorded() -> None:
    dll = ToyDll()
    out = ctypes.c_uint64()
    assert dll.function("ToyCreate")(4, ctypes.byref(out)) == 0
    assert out.value == 0x1004
    assert [r.rule for r in dll.rejections] == [ADVICE]
    with pytest.raises(AssertionError, match="TOY-ADVICE"):
        dll.assert_no_rejections()


def test_bool_exports_set_the_threads_last_error() -> None:
    dll = ToyDll()
    host = DllHost(dll)
    host.call_bool("ToyIsReady", 1)
    with pytest.raises(HypervisorError) as caught:
        host.call_bool("ToyIsReady", 0)
    assert (caught.value.code, caught.value.space) == (21, ErrorSpace.WIN32)
    seen: list[int] = []
    other = threading.Thread(target=lambda: seen.append(dll.last_error()))
    other.start()
    other.join()
    assert seen == [0]  # the last error is per thread
    assert dll.last_error() == 21


def test_optional_exports_can_be_missing() -> None:
    dll = ToyDll()
    assert dll.has("ToyQuery")
    assert not dll.has("ToyNewer")
    with pytest.raises(KeyError):
        dll.function("ToyNewer")


def test_a_callback_calling_the_dll_again_is_recorded_as_nested() -> None:
    import cffi

    plugin_ffi = cffi.FFI()  # the plugin's own declarations, not the model's
    dll = ToyDll()
    host = DllHost(dll)
    seen: list[tuple[int, int]] = []

    @plugin_ffi.callback("int32_t(void *, uint32_t)")
    def on_io(context: object, value: int) -> int:
        seen.append((int(plugin_ffi.cast("uintptr_t", context)), value))
        return host.call_hresult("ToyQuery", value)  # re-entrant: back into the DLL

    pointer = int(plugin_ffi.cast("uintptr_t", on_io))
    assert host.call_hresult("ToyEmulate", pointer, 0xC0FFEE) == 21
    assert seen == [(0xC0FFEE, 7)]
    emulate, callback, query = dll.calls
    assert (emulate.name, emulate.depth, emulate.parent) == ("ToyEmulate", 0, None)
    assert (callback.op, callback.name, callback.parent, callback.depth) == ("callback", "ToyIoPortCallback", 1, 1)
    assert (query.name, query.parent, query.depth, query.result) == ("ToyQuery", callback.seq, 2, 21)
    assert emulate.result == 21
    with pytest.raises(HypervisorError) as caught:
        host.call_hresult("ToyEmulate", 0, 0)  # a NULL callback
    assert caught.value.code == 0x80004003


# --- a Windows driver through DeviceIoControl ---------------------------------------------

TOY_GET_VERSION, TOY_ECHO = 0x222000, 0x222004
BAD_LENGTH = dm.Rule("ERROR_INVALID_PARAMETER", 87, "wrong in size", "this test", space=ErrorSpace.WIN32)


class ToyDriverHandle(dm.IoControlObject):
    kind = "toy-driver"

    @dm.control(TOY_GET_VERSION, "TOY_GET_VERSION")
    def version(self, data: bytes, out_size: int) -> bytes:
        return struct.pack("<II", 4, 1)[:out_size]

    @dm.control(TOY_ECHO, "TOY_ECHO")
    def echo(self, data: bytes, out_size: int) -> bytes:
        if len(data) != 4:
            raise dm.RuleViolation(BAD_LENGTH, f"{len(data)} bytes")
        return data[::-1]


class ToyWindowsDriver(dm.DeviceIoControlModel):
    def __init__(self) -> None:
        super().__init__()
        self.devices[r"\\.\TOY"] = ToyDriverHandle


def test_device_io_control_buffers_returned_length_and_last_error() -> None:
    driver = ToyWindowsDriver()
    host = DllHost(driver)
    handle = driver.function("CreateFileW")(r"\\.\TOY", 0xC0000000, 0, None, 3, 0, None)
    assert handle != dm.INVALID_HANDLE_VALUE
    out = ctypes.create_string_buffer(8)
    returned = ctypes.c_uint32(99)
    host.call_bool("DeviceIoControl", handle, TOY_GET_VERSION, None, 0, out, 8, ctypes.byref(returned), None)
    assert (out.raw, returned.value) == (struct.pack("<II", 4, 1), 8)
    data = ctypes.create_string_buffer(b"abcd", 4)
    host.call_bool("DeviceIoControl", handle, TOY_ECHO, data, 4, out, 8, ctypes.byref(returned), None)
    assert (out.raw[:4], returned.value) == (b"dcba", 4)
    with pytest.raises(HypervisorError) as wrong:
        host.call_bool("DeviceIoControl", handle, TOY_ECHO, data, 3, out, 8, ctypes.byref(returned), None)
    assert (wrong.value.code, wrong.value.space) == (87, ErrorSpace.WIN32)
    with pytest.raises(HypervisorError) as unknown:
        host.call_bool("DeviceIoControl", handle, 0x222FFC, None, 0, None, 0, None, None)
    assert unknown.value.code == dm.ERROR_INVALID_FUNCTION
    with pytest.raises(HypervisorError) as fault:
        host.call_bool("DeviceIoControl", handle, TOY_ECHO, data, 4, 8, 8, None, None)  # out buffer nowhere
    assert fault.value.code == dm.ERROR_NOACCESS
    names = [c.name for c in driver.calls if c.op == "call"]
    assert names == ["CreateFileW", "TOY_GET_VERSION", "TOY_ECHO", "TOY_ECHO", "control 0x222ffc", "TOY_ECHO"]
    host.call_bool("CloseHandle", handle)
    with pytest.raises(HypervisorError) as closed:
        host.call_bool("DeviceIoControl", handle, TOY_GET_VERSION, None, 0, out, 8, None, None)
    assert closed.value.code == dm.ERROR_INVALID_HANDLE
    assert driver.function("CreateFileW")(r"\\.\NOPE") == dm.INVALID_HANDLE_VALUE
    assert driver.last_error() == dm.ERROR_FILE_NOT_FOUND


# --- shared pages and eventfds -------------------------------------------------------


def test_shared_page_is_one_memory_in_two_mappings() -> None:
    page = dm.SharedPage()
    theirs = page.map()
    try:
        theirs[5] = 0xAB
        assert page.view[5] == 0xAB
        page.view[6] = 0xCD
        assert theirs[6] == 0xCD
    finally:
        theirs.close()
        page.close()


def test_eventfd_helpers_never_block() -> None:
    blocking = os.eventfd(0)
    try:
        assert dm.DeviceFileModel.is_eventfd(blocking)
        assert dm.DeviceFileModel.drain_eventfd(blocking) == 0  # would block: not read
        dm.DeviceFileModel.signal_eventfd(blocking)
        assert dm.DeviceFileModel.drain_eventfd(blocking) == 1
    finally:
        os.close(blocking)
    assert not dm.DeviceFileModel.is_eventfd(0)
