"""The driver-model harness: test a backend whose hypervisor cannot run here.

Gunyah, GenieZone, HAXM and WHPX cannot run on the machines pyvmm is developed
on.  Their plugins are written to the real interface, and their tests replace
the *kernel driver* (or the DLL) with a **driver model**: an in-process object
that answers the same calls with the same results and errnos, enforces the
interface's documented rules, and runs guest code on a software CPU
(:mod:`pyvmm.softcpu`), producing the exits the real driver would.  Everything
above the seam -- bindings, struct packing, the run loop, exit decoding -- is the
code that ships.

How the pieces fit
==================

::

    plugin code (vm.py, vcpu.py, ...)        <- ships, under test
        |  host.ioctl(fd, request, arg)
    plugin host.py: HOST = HostSwitch(...)    <- the kit's one switch
        |  real: LibcDeviceSeam (libc ioctl/mmap)      tests: the model
    DeviceFileModel subclass (tests only)     <- this module's base classes
        |  FileObject per fd kind, @handles(request) methods, Rules
    GuestCpu (pyvmm.softcpu engine)           <- runs the guest for RUN

1. **The seam.**  A plugin routes every system call through one object
   satisfying :class:`pyvmm.backend.seam.DeviceSeam` (open, close, ioctl, mmap,
   signalling a thread).  In production that object is the backend kit's
   :class:`~pyvmm.backend.seam.LibcDeviceSeam`.  The plugin's ``host.py`` holds
   one :class:`~pyvmm.backend.host.HostSwitch`, whose ``use(seam)`` only tests
   (and ``pyvmm.testing``) touch; the plugin's other modules never know which
   seam they talk to.  Conventions, chosen to match the raw system calls so that the real
   seam is a thin shim:

   * ``ioctl``, ``open`` and ``close`` return the non-negative result or
     ``-errno`` -- no exception on the per-exit path;
   * ``ioctl``'s ``arg`` is always an integer: the value itself, or the address of
     the argument struct (``int(ffi.cast("uintptr_t", ptr))``), exactly what the
     kernel receives.  The model reads and writes the plugin's structs through
     :meth:`ModelCore.copy_from_user` / :meth:`ModelCore.copy_to_user`;
   * ``mmap`` returns an :class:`mmap.mmap` or raises :class:`OSError`;
   * ``signal_thread`` is how a kick interrupts a vCPU blocked in the driver.

   A DLL-based hypervisor (WHPX, HAXM on Windows) has a function table instead of
   device files: its seam is the object whose attributes are the DLL's functions.
   The model then subclasses :class:`ModelCore` directly and marks each exported
   function with :func:`exported`, which logs the call and turns a rule violation
   into the error value the DLL returns (``HRESULT``, ``BOOL`` + last error).

2. **Rules.**  Every constraint the interface documents is a :class:`Rule`:
   an id, the errno (or error value) the real driver gives, a one-line summary and
   the **source** it comes from (a citation into
   the backend's notes ``docs/backends/<name>.md`` and the upstream driver file
   or documentation page they summarise).  A
   handler enforces one with ``raise RuleViolation(RULE, "detail")``.  The
   harness returns the rule's errno to the caller, logs the call with the rule
   attached and appends a :class:`Rejection` to :attr:`ModelCore.rejections`, so

   * a test that runs the plugin through a full scenario asserts
     ``model.assert_no_rejections()`` -- the plugin broke no rule; and
   * a negative test makes one deliberately wrong call through the seam and
     asserts both the errno and ``model.last_rejection.rule is RULE``.

   A rule with errno 0 is *advisory*: the real driver accepts the call but the
   interface's documentation forbids it (Gunyah: memory after start).  The
   handler calls :meth:`ModelCore.advise`; the call succeeds and the rejection is
   still recorded.

   Results that are part of the normal protocol (``EINTR`` after a kick, a
   sticky status exit) are *not* rules: they are returned without a rejection.
   Something the model does not model raises :class:`ModelGap`, an
   ``AssertionError`` that fails the test instead of inventing an answer.

3. **Caller rights.**  Drivers tie objects to the process that made them (Gunyah:
   the VM creator's ``mm``).  :attr:`ModelCore.caller` is the identity of the
   current caller; ``with model.foreign_process():`` makes the calls inside come
   from another process, for ``EPERM`` rules.  A :class:`FileObject` records its
   creator in :attr:`FileObject.owner`.

   Signals follow the kernel: :meth:`ModelCore.post_signal` (what
   ``signal_thread`` does) wakes the thread's sleep (:meth:`ModelCore.sleep_until`)
   and calls :meth:`ModelCore.on_signal` so the model can stop a guest running on
   that thread; a handler that notices it returns ``-EINTR``; and every signal
   pending when a call returns is delivered then (:meth:`ModelCore.deliver_signals`),
   noticed or not.

4. **The call log.**  Every seam call is a :class:`CallRecord` in
   :attr:`ModelCore.calls` (sequence number, operation, fd kind, request name,
   argument, result, rule).  Tests assert on it -- e.g. that no register-setting
   request was ever issued.

5. **Guest execution.**  :class:`GuestCpu` wraps one software CPU of
   :mod:`pyvmm.softcpu` for a vCPU: the model maps the guest memory the plugin
   handed over (zero-copy, the plugin's own host pages), sets the registers the
   *hypervisor* would set, and turns the engine's stops into what the driver
   reports (an MMIO exit to complete on the next run, a hypercall the model
   handles itself, a halt it sleeps through).

Building the next backend's model
=================================

1. Write the backend's ``docs/backends/<name>.md`` from its upstream sources: ioctls,
   structs, lifecycle, exits, "may NOT do", and its model checklist.
2. Build the plugin on the backend kit: its ``host.py`` is one
   :class:`~pyvmm.backend.host.HostSwitch`, and every call goes through the
   :class:`~pyvmm.backend.host.DeviceHost` it hands out.
3. In the plugin's ``tests/`` write ``<name>_model.py``: one module-level
   :class:`Rule` per documented constraint (cite the source), a
   :class:`DeviceFileModel` subclass whose ``devices`` maps the device path to a
   :class:`FileObject` factory, and one :class:`FileObject` subclass per fd kind
   (device, VM, vCPU) with a ``@handles(REQUEST, "NAME")`` method per ioctl.
   Handlers unpack the argument with ``copy_from_user`` and ``struct``, never with
   the plugin's bindings: the model must not agree with the plugin by
   construction.
4. Run guest code with :class:`GuestCpu`; translate its stops to the driver's
   exits in the run handler.
5. In ``tests/conftest.py`` install the model for the session (``host.use``) so
   ``pytest --pyvmm-backend NAME`` runs the conformance suite on it, and write a
   negative test for every rule.  Install it in ``pytest_configure``, not in a
   fixture: the conformance suite lives outside the plugin's test directory, which
   a conftest's fixtures do not reach.  A plugin object registered there with
   ``config.pluginmanager.register`` *does* reach every test, so an autouse
   fixture on it can check after each test that the session model saw no rule
   broken (pyvmm-gunyah's ``tests/conftest.py`` is the worked example, its
   ``tests/gunyah_model.py`` the model).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import functools
import mmap
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pyvmm.backend.seam import DeviceSeam
from pyvmm.boot import VcpuInit
from pyvmm.exits import InternalErrorExit, MmioExit, VcpuExit

if TYPE_CHECKING:
    from pyvmm.softcpu import Hypercall, SoftCpu

PAGE_SIZE = 4096

#: The caller identity of the test process itself.
SELF_PROCESS = "self"
#: The caller identity :meth:`ModelCore.foreign_process` switches to.
FOREIGN_PROCESS = "foreign"


# --- the seam -----------------------------------------------------------------


# The seam protocol is production code: it lives in the backend kit, and the
# models here implement it.
__all__ = ["DeviceSeam"]


# --- rules, rejections, the call log ---------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One documented constraint of the interface.

    ``errno`` is what the real driver returns when the constraint is broken (for
    a DLL model: whatever error code its :meth:`ModelCore.error_value` maps it to).
    ``source`` cites where the rule comes from.
    """

    id: str
    errno: int
    summary: str
    source: str

    def __str__(self) -> str:
        name = errno_mod.errorcode.get(self.errno, str(self.errno))
        return f"{self.id} ({name}): {self.summary} [{self.source}]"


class RuleViolation(Exception):
    """Raised inside a handler to refuse a call; the harness turns it into the
    rule's errno for the caller."""

    def __init__(self, rule: Rule, detail: str = "") -> None:
        super().__init__(f"{rule}: {detail}" if detail else str(rule))
        self.rule = rule
        self.detail = detail


class ModelGap(AssertionError):
    """The plugin used a part of the interface the model does not model.  Fails
    the test: a model never makes an answer up."""


@dataclass
class CallRecord:
    """One call through the seam."""

    seq: int
    op: str  # "open", "close", "ioctl", "mmap", "eventfd", "signal" or a DLL function
    target: str  # the fd kind ("gunyah-vm", ...) or the path/function
    name: str  # the request name, for ioctls
    arg: int
    caller: str
    thread: int
    result: int = 0
    rule: Rule | None = None

    @property
    def errno(self) -> int | None:
        return -self.result if self.result < 0 else None


@dataclass(frozen=True)
class Rejection:
    """A rule the caller broke, and the call that broke it."""

    rule: Rule
    detail: str
    call: CallRecord


class ModelCore:
    """What every driver model has: rules, the call log, rejections, caller
    rights, user-memory access and interruptible sleeping."""

    #: How long a model vCPU may sleep (WFI, powered off) before the harness
    #: decides nothing will ever wake it and fails the test.
    sleep_limit: float = 10.0

    def __init__(self) -> None:
        self.calls: list[CallRecord] = []
        self.rejections: list[Rejection] = []
        self.caller: str = SELF_PROCESS
        self.lock = threading.RLock()
        #: Notified whenever something a sleeping vCPU may wait for happens.
        self.wakeup = threading.Condition(self.lock)
        self._seq = 0
        self._signals: dict[int, int] = {}
        self._current = threading.local()

    # --- logging and rules ------------------------------------------------------
    def record(self, op: str, target: str, name: str, arg: int = 0) -> CallRecord:
        with self.lock:
            self._seq += 1
            call = CallRecord(self._seq, op, target, name, arg, self.caller, threading.get_ident())
            self.calls.append(call)
        self._current.call = call
        return call

    @property
    def current_call(self) -> CallRecord | None:
        """The call the calling thread is in (for handlers that :meth:`advise`)."""
        call: CallRecord | None = getattr(self._current, "call", None)
        return call

    @staticmethod
    def violation(rule: Rule, detail: str = "") -> RuleViolation:
        """The exception a handler raises to refuse a call under ``rule``."""
        return RuleViolation(rule, detail)

    def reject(self, call: CallRecord, violation: RuleViolation) -> int:
        """Record ``violation`` against ``call``; returns ``-errno``."""
        call.rule = violation.rule
        call.result = -violation.rule.errno
        self.rejections.append(Rejection(violation.rule, violation.detail, call))
        return call.result

    def advise(self, rule: Rule, detail: str = "") -> None:
        """Record that the current call breaks advisory ``rule`` (errno 0): the
        real driver accepts the call, the interface's documentation forbids it.
        The call goes through; :meth:`assert_no_rejections` still fails."""
        call = self.current_call
        if call is None:
            call = self.record("advice", "-", rule.id)
        call.rule = rule
        self.rejections.append(Rejection(rule, detail, call))

    @property
    def last_rejection(self) -> Rejection | None:
        return self.rejections[-1] if self.rejections else None

    def rejected(self, rule: Rule) -> list[Rejection]:
        return [r for r in self.rejections if r.rule is rule]

    def assert_no_rejections(self) -> None:
        """Fail, listing them, if the caller broke any rule."""
        if self.rejections:
            lines = "\n".join(f"  #{r.call.seq} {r.call.name}: {r.rule} {r.detail}" for r in self.rejections)
            raise AssertionError(f"the plugin broke {len(self.rejections)} rule(s) of the interface:\n{lines}")

    def calls_named(self, *names: str) -> list[CallRecord]:
        return [c for c in self.calls if c.name in names]

    def error_value(self, rule: Rule) -> int:
        """What an :func:`exported` DLL function returns for a broken ``rule``;
        DLL models override it (an ``HRESULT``, say).  Default: ``-errno``."""
        return -rule.errno

    def not_modelled(self, what: str) -> ModelGap:
        return ModelGap(f"{type(self).__name__} does not model {what}")

    # --- caller rights ----------------------------------------------------------
    @contextlib.contextmanager
    def foreign_process(self) -> Iterator[None]:
        """Calls inside come from another process (another ``mm``)."""
        previous, self.caller = self.caller, FOREIGN_PROCESS
        try:
            yield
        finally:
            self.caller = previous

    # --- user memory --------------------------------------------------------------
    def copy_from_user(self, address: int, size: int) -> bytes:
        """The ``size`` bytes the caller passed at ``address`` (its struct).

        The model runs in the caller's process, so this is a plain read; only the
        null page is refused (``EFAULT``), as an arbitrary bad pointer cannot be
        detected without faulting.
        """
        if address < PAGE_SIZE:
            raise RuleViolation(EFAULT_RULE, f"user pointer {address:#x}")
        return ctypes.string_at(address, size)

    def copy_to_user(self, address: int, data: bytes) -> None:
        if address < PAGE_SIZE:
            raise RuleViolation(EFAULT_RULE, f"user pointer {address:#x}")
        ctypes.memmove(address, data, len(data))

    # --- signals and sleeping -------------------------------------------------------
    def post_signal(self, thread_id: int) -> None:
        """A signal for ``thread_id``: it interrupts that thread's sleep or run."""
        with self.lock:
            self._signals[thread_id] = self._signals.get(thread_id, 0) + 1
            self.wakeup.notify_all()
        self.on_signal(thread_id)

    def on_signal(self, thread_id: int) -> None:
        """Hook: stop a guest running on ``thread_id`` (kick its engine)."""

    def deliver_signals(self) -> None:
        """The calling thread returns to user space: its pending signals are
        delivered (their handlers run), whether or not the call noticed them."""
        me = threading.get_ident()
        if self._signals.get(me):
            with self.lock:
                self._signals.pop(me, None)

    def signal_pending(self) -> bool:
        """Whether a signal is pending for the calling thread."""
        return self._signals.get(threading.get_ident(), 0) > 0

    def take_signal(self) -> bool:
        """Consume a signal pending for the calling thread (the syscall returns
        ``EINTR``, the handler runs)."""
        me = threading.get_ident()
        with self.lock:
            if self._signals.get(me, 0) > 0:
                self._signals[me] -= 1
                return True
        return False

    def sleep_until(self, ready: Callable[[], bool], what: str, poll: float | None = None) -> bool:
        """Sleep interruptibly until ``ready()``: True when ready, False when a
        signal for this thread arrived first.  :meth:`notify` re-checks at once;
        ``poll`` (seconds) re-checks periodically too, for conditions nothing can
        notify (an eventfd written by another thread).  Sleeping longer than
        :attr:`sleep_limit` fails the test (``what`` says what was awaited)."""
        deadline = time.monotonic() + self.sleep_limit
        with self.wakeup:
            while True:
                if ready():
                    return True
                if self.signal_pending():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ModelGap(f"a vCPU slept {self.sleep_limit}s waiting for {what}; nothing would wake it")
                self.wakeup.wait(left if poll is None else min(left, poll))

    def notify(self) -> None:
        """Wake sleepers to re-check their conditions."""
        with self.wakeup:
            self.wakeup.notify_all()


#: ``copy_from_user`` on a null pointer.
EFAULT_RULE = Rule(
    "EFAULT",
    errno_mod.EFAULT,
    "the argument pointer is not a valid user address",
    "copy_from_user(), every ioctl that takes a struct",
)


# --- device files -------------------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., int])


def handles(request: int, name: str) -> Callable[[_F], _F]:
    """Mark a :class:`FileObject` method as the handler of ioctl ``request``.
    The method takes the integer argument and returns the result (or raises a
    :class:`RuleViolation`)."""

    def mark(method: _F) -> _F:
        method.__dict__["_ioctl"] = (request, name)
        return method

    return mark


class FileObject:
    """What an open file descriptor of the model refers to: one per fd kind.

    Subclasses set :attr:`kind` (shown in the call log) and mark handlers with
    :func:`handles`; an ioctl without a handler fails with ``ENOTTY`` under
    :data:`NO_SUCH_IOCTL` (the driver's ``default:`` case).
    """

    kind: ClassVar[str] = "file"
    _handlers: ClassVar[dict[int, tuple[str, str]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[int, tuple[str, str]] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                mark = getattr(value, "_ioctl", None)
                if mark is not None:
                    table[mark[0]] = (attr, mark[1])
        cls._handlers = table

    def __init__(self, model: DeviceFileModel) -> None:
        self.model = model
        self.owner = model.caller
        self.fd = -1
        self.closed = False

    @classmethod
    def ioctl_name(cls, request: int) -> str:
        entry = cls._handlers.get(request)
        return entry[1] if entry else f"ioctl {request:#x}"

    def dispatch(self, request: int, arg: int) -> int:
        entry = self._handlers.get(request)
        if entry is None:
            raise RuleViolation(NO_SUCH_IOCTL, f"{self.kind} has no ioctl {request:#x}")
        method: Callable[[int], int] = getattr(self, entry[0])
        return method(arg)

    def mmap(self, length: int, offset: int) -> mmap.mmap:
        raise RuleViolation(NO_MMAP, f"{self.kind} cannot be mapped")

    def release(self) -> None:
        """The last close of the fd."""


NO_SUCH_IOCTL = Rule(
    "NO-SUCH-IOCTL",
    errno_mod.ENOTTY,
    "the file has no such ioctl",
    "the driver's unlocked_ioctl default case",
)
NO_MMAP = Rule("NO-MMAP", errno_mod.ENODEV, "the file cannot be mapped", "a file_operations without .mmap")
BAD_FD = Rule("EBADF", errno_mod.EBADF, "not an open file descriptor", "fdget()")
NO_DEVICE = Rule("ENOENT", errno_mod.ENOENT, "no such device node", "open(2) of a path that does not exist")


class SharedPage:
    """A page shared between the driver and the process that maps it (a vCPU run
    page).  It is a memfd, so the model and the plugin each hold their own
    mapping of the same memory, as with the real driver."""

    def __init__(self, size: int = PAGE_SIZE, name: str = "pyvmm-model-page") -> None:
        self.size = size
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self.mapping = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        #: The model's own view of the page.
        self.view = memoryview(self.mapping)

    def map(self) -> mmap.mmap:
        """A new mapping of the page for the caller."""
        return mmap.mmap(self._fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):
            self.mapping.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DeviceFileModel(ModelCore):
    """A model of a device-file driver; satisfies :class:`DeviceSeam`.

    :attr:`devices` maps a path to a factory of the :class:`FileObject` that
    opening it gives.  File descriptors are real, reserved descriptors (dups of
    ``/dev/null``), so a model fd never collides with a real one and a leaked
    model fd is a leaked process fd.
    """

    devices: dict[str, Callable[[DeviceFileModel], FileObject]]

    def __init__(self) -> None:
        super().__init__()
        self.devices = {}
        self.files: dict[int, FileObject] = {}

    # --- fd table -------------------------------------------------------------------
    def install(self, obj: FileObject) -> int:
        """Give ``obj`` a new file descriptor (as ``anon_inode_getfile`` + ``fd_install``)."""
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        obj.fd = fd
        with self.lock:
            self.files[fd] = obj
        return fd

    def file(self, fd: int) -> FileObject:
        obj = self.files.get(fd)
        if obj is None:
            raise RuleViolation(BAD_FD, f"fd {fd}")
        return obj

    def open_fds(self) -> list[FileObject]:
        return list(self.files.values())

    # --- the seam ---------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        call = self.record("open", path, "open", flags)
        factory = self.devices.get(path)
        if factory is None:
            return self.reject(call, RuleViolation(NO_DEVICE, path))
        call.result = self.install(factory(self))
        return call.result

    def close(self, fd: int) -> int:
        obj = self.files.get(fd)
        call = self.record("close", obj.kind if obj else "?", "close", fd)
        if obj is None:
            return self.reject(call, RuleViolation(BAD_FD, f"fd {fd}"))
        with self.lock:
            del self.files[fd]
        os.close(fd)
        obj.closed = True
        obj.release()
        return 0

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        obj = self.files.get(fd)
        kind = obj.kind if obj is not None else "?"
        call = self.record("ioctl", kind, obj.ioctl_name(request) if obj else f"ioctl {request:#x}", arg)
        try:
            if obj is None:
                raise RuleViolation(BAD_FD, f"fd {fd}")
            result = obj.dispatch(request, arg)
        except RuleViolation as violation:
            return self.reject(call, violation)
        finally:
            self.deliver_signals()
        call.result = result
        return result

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        obj = self.files.get(fd)
        call = self.record("mmap", obj.kind if obj else "?", "mmap", offset)
        try:
            if obj is None:
                raise RuleViolation(BAD_FD, f"fd {fd}")
            return obj.mmap(length, offset)
        except RuleViolation as violation:
            err = -self.reject(call, violation)
            raise OSError(err, f"mmap: {violation}") from None

    def eventfd(self, initval: int, flags: int) -> int:
        fd = os.eventfd(initval, flags)
        self.record("eventfd", "eventfd", "eventfd", initval).result = fd
        return fd

    def signal_thread(self, thread_id: int, signum: int) -> None:
        self.record("signal", "thread", "signal", signum).result = 0
        self.post_signal(thread_id)

    # --- helpers for handlers -------------------------------------------------------
    @staticmethod
    def is_eventfd(fd: int) -> bool:
        """Whether ``fd`` is an open eventfd of this process (``eventfd_ctx_fdget``)."""
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            return False

    @staticmethod
    def drain_eventfd(fd: int) -> int:
        """Read and reset an eventfd's counter (0 when nothing was written).  The fd
        may be blocking (it is the caller's): it is read only when readable."""
        readable, _, _ = select.select([fd], [], [], 0)
        if not readable:
            return 0
        try:
            return int.from_bytes(os.read(fd, 8), "little")
        except BlockingIOError:
            return 0

    @staticmethod
    def signal_eventfd(fd: int) -> None:
        os.write(fd, (1).to_bytes(8, "little"))

    def close_all(self) -> None:
        """Close every fd the caller left open (teardown of a test)."""
        for fd in list(self.files):
            self.close(fd)


# --- DLL function tables ------------------------------------------------------------

_R = TypeVar("_R")


def exported(name: str) -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """Mark a method of a :class:`ModelCore` subclass as DLL function ``name``:
    the call is logged, and a :class:`RuleViolation` becomes
    ``self.error_value(rule)`` (an ``HRESULT``, say) instead of an exception."""

    def wrap(method: Callable[..., _R]) -> Callable[..., _R]:
        @functools.wraps(method)
        def call(self: Any, *args: Any) -> Any:
            record = self.record("call", name, name, int(args[0]) if args and isinstance(args[0], int) else 0)
            try:
                result = method(self, *args)
            except RuleViolation as violation:
                self.reject(record, violation)
                return self.error_value(violation.rule)
            record.result = result if isinstance(result, int) else 0
            return result

        return call

    return wrap


# --- guest execution ----------------------------------------------------------------


class GuestCpu:
    """One vCPU's software CPU, as a driver model drives it.

    A thin layer over :class:`pyvmm.softcpu.SoftCpu` (unicorn is imported when
    the first one is made, never by importing this module) with what every model
    needs on top of the engine's own exits:

    * the model maps the memory the plugin handed the driver (:meth:`map`, the
      plugin's own host pages, zero-copy) and sets the registers the
      *hypervisor* chooses (:meth:`init`);
    * :meth:`run` returns the engine's exit; an MMIO read is completed with
      :meth:`complete_read` before the next run, which is how a driver's "next
      RUN hands the data back" reaches the guest;
    * HVC/SMC go to ``hypercalls`` first (the hypervisor's own handling, e.g.
      PSCI): it returns True when it answered the call (X0 set), an exit to end
      the run, or None for the engine's default;
    * :meth:`fetch_fault` tells an instruction fetch from unbacked memory (a
      guest page fault) from other emulation failures.

    Every method but :meth:`kick` belongs to the thread that runs the vCPU.
    """

    def __init__(
        self, arch: str, hypercalls: Callable[[SoftCpu, Hypercall], VcpuExit | bool | None] | None = None
    ) -> None:
        from pyvmm.softcpu import SoftCpu

        self.engine = SoftCpu(arch)
        self.engine.hypercall_handler = hypercalls
        self._last: VcpuExit | None = None

    def map(self, gpa: int, size: int, host_addr: int, *, writable: bool = True) -> None:
        self.engine.map_host(gpa, size, host_addr, read_only=not writable)

    def init(self, boot: VcpuInit) -> None:
        self.engine.init(boot)

    def run(self) -> VcpuExit:
        exit_ = self.engine.run()
        self._last = exit_
        return exit_

    def complete_read(self, data: bytes) -> None:
        """Hand ``data`` to the guest's pending MMIO read (taken by the next :meth:`run`)."""
        last = self._last
        if not isinstance(last, MmioExit) or last.is_write:
            raise ModelGap("an MMIO read completion without a pending MMIO read")
        last.data[: len(data)] = data[: last.size]

    def fetch_fault(self, exit_: VcpuExit) -> int | None:
        """The guest-physical address of an instruction fetch that no memory backs,
        if that is what ended the run (the PC is left on it), else None."""
        if not isinstance(exit_, InternalErrorExit):
            return None
        pc = self.engine.pc
        return pc if self.engine.read_physical(pc, 4) is None else None

    def kick(self) -> None:
        """From any thread: end the current or next :meth:`run` with an interrupted exit."""
        self.engine.kick()

    def close(self) -> None:
        self.engine.close()
