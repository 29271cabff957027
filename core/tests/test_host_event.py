"""pyvmm.host.Event on POSIX: the eventfd kind (Linux) and the pipe kind (other POSIX)."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable

import pytest

from pyvmm.errors import ConfigError, VmStateError
from pyvmm.host import Event, EventFd, PipeEvent, default_event_class

fcntl = pytest.importorskip("fcntl", reason="the POSIX kinds; Windows has test_host_win32.py")

linux_only = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="eventfd(2) is Linux-only")

KINDS: list[Callable[[], Event]] = [pytest.param(EventFd, marks=linux_only), PipeEvent]  # type: ignore[list-item]


@pytest.fixture(params=KINDS, ids=["eventfd", "pipe"])
def event(request: pytest.FixtureRequest) -> Event:
    made: Event = request.param()
    request.addfinalizer(made.close)
    return made


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_event_picks_eventfd_on_linux_and_a_pipe_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    if hasattr(os, "eventfd"):
        assert default_event_class() is EventFd
        with Event() as event:
            assert type(event) is EventFd
            assert os.readlink(f"/proc/self/fd/{event.fileno()}") == "anon_inode:[eventfd]"
    monkeypatch.delattr(os, "eventfd", raising=False)
    assert default_event_class() is PipeEvent
    with Event() as event:
        assert type(event) is PipeEvent


def test_descriptors_are_non_blocking_and_close_on_exec(event: Event) -> None:
    fd = event.fileno()
    assert os.get_blocking(fd) is False
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert not os.get_inheritable(fd)


def test_signals_count_and_consume_resets(event: Event) -> None:
    assert event.consume() == 0
    event.signal()
    event.set()
    event.signal()
    assert event.read() == 3
    assert event.consume() == 0


def test_wait_does_not_consume(event: Event) -> None:
    assert event.wait(0) is False
    assert event.wait(0.01) is False
    event.signal()
    assert event.wait(0) is True
    assert event.wait(None) is True  # already signalled: returns at once
    assert event.consume() == 1


def test_wait_is_woken_by_a_signal_from_another_thread(event: Event) -> None:
    threading.Timer(0.05, event.signal).start()
    started = time.monotonic()
    assert event.wait(10) is True
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("timeout", [float("nan"), "1", True])
def test_wait_refuses_a_timeout_that_is_not_a_number(event: Event, timeout: object) -> None:
    with pytest.raises(ConfigError, match="timeout must be None or a number"):
        event.wait(timeout)  # type: ignore[arg-type]


def test_close_is_idempotent_and_frees_the_descriptor(event: Event) -> None:
    fd = event.fileno()
    assert _is_open(fd)
    event.close()
    event.close()
    assert event.closed
    assert not _is_open(fd)
    for call in (event.signal, event.consume, lambda: event.wait(0), event.fileno):
        with pytest.raises(VmStateError, match="closed"):
            call()


def test_context_manager_closes(event: Event) -> None:
    with event as same:
        assert same is event
    assert event.closed


def test_close_wakes_a_waiter_and_frees_the_descriptor_after_it_left(event: Event) -> None:
    fd = event.fileno()
    outcome: list[BaseException | bool] = []
    entered = threading.Event()

    def waiter() -> None:
        entered.set()
        try:
            outcome.append(event.wait())
        except BaseException as exc:  # noqa: BLE001 - the test asserts on what the thread raised
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    entered.wait(10)
    time.sleep(0.05)  # let it block in poll()
    event.close()
    thread.join(10)
    assert not thread.is_alive(), "close() did not wake the waiter"
    assert len(outcome) == 1 and isinstance(outcome[0], VmStateError)
    assert not _is_open(fd)


def test_signal_never_blocks_when_the_counter_is_full() -> None:
    if not hasattr(os, "eventfd"):
        pytest.skip("eventfd(2) is Linux-only")
    with EventFd() as event:
        os.eventfd_write(event.fileno(), 0xFFFF_FFFF_FFFF_FFFD)  # one below the maximum (eventfd(2))
        event.signal()
        event.signal()  # would block: coalesced instead
        assert event.consume() == 0xFFFF_FFFF_FFFF_FFFE


def test_signal_never_blocks_when_the_pipe_is_full() -> None:
    with PipeEvent() as event:
        for _ in range(200_000):  # far beyond any pipe buffer
            event.signal()
        count = event.consume()
        assert 0 < count < 200_000
        assert event.consume() == 0


@pytest.mark.parametrize("initial", [-1, 1 << 32, True, 1.0])
def test_eventfd_initial_value_is_checked(initial: object) -> None:
    if not hasattr(os, "eventfd"):
        pytest.skip("eventfd(2) is Linux-only")
    with pytest.raises(ConfigError, match="initial must be an integer from 0 to 0xffffffff"):
        EventFd(initial)  # type: ignore[arg-type]


def test_eventfd_initial_value() -> None:
    if not hasattr(os, "eventfd"):
        pytest.skip("eventfd(2) is Linux-only")
    with EventFd(5) as event:
        assert event.wait(0)
        assert event.consume() == 5


def test_an_unclosed_event_warns_and_frees_its_descriptor() -> None:
    event = PipeEvent()
    fd = event.fileno()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del event
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) and "unclosed" in str(w.message) for w in caught)
    assert not _is_open(fd)


def test_many_threads_signal_while_one_consumes(event: Event) -> None:
    """Concurrent signal() and consume() never lose a signal of an eventfd, and never
    raise anything but the closed error for any kind."""
    per_thread, threads = 500, 4
    consumed = 0
    stop = threading.Event()

    def consumer() -> None:
        nonlocal consumed
        while not stop.is_set():
            if event.wait(0.01):
                consumed += event.consume()
        consumed += event.consume()

    def producer() -> None:
        for _ in range(per_thread):
            event.signal()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        reader = threading.Thread(target=consumer)
        reader.start()
        writers = [threading.Thread(target=producer) for _ in range(threads)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        stop.set()
        reader.join()
    finally:
        sys.setswitchinterval(old)
    assert consumed == per_thread * threads
