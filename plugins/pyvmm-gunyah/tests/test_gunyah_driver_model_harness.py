"""The generic parts of :mod:`pyvmm.testing.driver_model` that the Gunyah model
relies on but does not exercise by itself: the DLL-style function table, signal
delivery, the sleep limit, shared pages, advisory rules."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from pyvmm.testing import driver_model as dm

RULE = dm.Rule("TOY-ARG", errno.EINVAL, "the toy's argument must be even", "this test")
ADVICE = dm.Rule("TOY-ADVICE", 0, "odd but accepted", "this test")


class ToyDll(dm.ModelCore):
    """A DLL-style model: functions, not device files."""

    @dm.exported("ToyCall")
    def toy_call(self, value: int) -> int:
        if value % 2:
            raise dm.RuleViolation(RULE, f"value {value}")
        if value == 4:
            self.advise(ADVICE, "four")
        return 0

    def error_value(self, rule: dm.Rule) -> int:
        return 0x80070057  # E_INVALIDARG, as WHPX would answer


class ToyFile(dm.FileObject):
    kind = "toy"

    @dm.handles(0x1234, "TOY_IOCTL")
    def toy(self, arg: int) -> int:
        return arg + 1


class ToyDevice(dm.DeviceFileModel):
    def __init__(self) -> None:
        super().__init__()
        self.devices["/dev/toy"] = ToyFile


def test_exported_function_logs_and_maps_a_rule_to_the_dll_error() -> None:
    dll = ToyDll()
    assert dll.toy_call(2) == 0
    assert dll.toy_call(3) == 0x80070057
    assert [(c.name, c.arg, c.rule) for c in dll.calls] == [("ToyCall", 2, None), ("ToyCall", 3, RULE)]
    assert dll.last_rejection is not None
    assert dll.last_rejection.rule is RULE


def test_advisory_rule_lets_the_call_through_but_is_recorded() -> None:
    dll = ToyDll()
    assert dll.toy_call(4) == 0
    assert [r.rule for r in dll.rejections] == [ADVICE]
    with pytest.raises(AssertionError, match="TOY-ADVICE"):
        dll.assert_no_rejections()


def test_device_file_dispatch_and_fd_rules() -> None:
    toy = ToyDevice()
    fd = toy.open("/dev/toy", 0)
    try:
        assert toy.ioctl(fd, 0x1234, 41) == 42
        assert toy.ioctl(fd, 0x9999, 0) == -errno.ENOTTY
        assert toy.last_rejection is not None
        assert toy.last_rejection.rule is dm.NO_SUCH_IOCTL
        with pytest.raises(OSError) as caught:
            toy.mmap(fd, 4096, 0)
        assert caught.value.errno == errno.ENODEV
        assert toy.open("/dev/nothing", 0) == -errno.ENOENT
    finally:
        assert toy.close(fd) == 0
    assert toy.ioctl(fd, 0x1234, 0) == -errno.EBADF
    assert toy.close(fd) == -errno.EBADF
    assert [c.name for c in toy.calls][:2] == ["open", "TOY_IOCTL"]


def test_a_signal_is_delivered_when_the_call_returns() -> None:
    toy = ToyDevice()
    fd = toy.open("/dev/toy", 0)
    try:
        toy.post_signal(threading.get_ident())
        assert toy.signal_pending()
        assert toy.ioctl(fd, 0x1234, 0) == 1  # the handler did not look; the signal still goes
        assert not toy.signal_pending()
    finally:
        toy.close(fd)


def test_sleep_wakes_on_a_signal_and_gives_up_after_the_limit() -> None:
    core = dm.ModelCore()
    core.sleep_limit = 0.2
    me = threading.get_ident()
    threading.Timer(0.05, core.post_signal, (me,)).start()
    assert core.sleep_until(lambda: False, "nothing") is False
    assert core.take_signal()
    with pytest.raises(dm.ModelGap, match="nothing would wake it"):
        core.sleep_until(lambda: False, "a doorbell")


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
