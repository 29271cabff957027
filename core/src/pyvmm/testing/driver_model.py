"""The driver-model harness: test a backend whose hypervisor cannot run here.

Gunyah, GenieZone, HAXM and WHPX cannot run on the machines pyvmm is developed
on.  Their plugins are written to the real interface, and their tests replace
the *kernel driver* (or the DLL) with a **driver model**: an in-process object
that answers the same calls with the same results and errnos, enforces the
interface's documented rules, and runs guest code on a software CPU
(:mod:`pyvmm.softcpu`), producing the exits the real driver would.  Everything
above the seam -- bindings, struct packing, the run loop, exit decoding -- is the
code that ships.  A model ships with its plugin (``pyvmm_<name>.model``), so a
VMM developer without the hardware can run against it too.

How the pieces fit
==================

::

    plugin code (vm.py, vcpu.py, ...)        <- ships, under test
        |  host.ioctl(fd, request, arg)          (or dll.call_hresult(...))
    plugin host.py: HOST = HostSwitch(...)    <- the kit's one switch
        |  real: LibcDeviceSeam / LoadedDll      models: below
    DeviceFileModel / DllModel /              <- this module's base classes
    DeviceIoControlModel subclass
        |  FileObject per fd kind with @handles(request) methods,
        |  @exported DLL functions, @control(code) device controls; Rules
    GuestCpu (pyvmm.softcpu engine)           <- runs the guest for RUN

1. **The seams.**  A device-file plugin routes every system call through one
   object satisfying :class:`pyvmm.backend.seam.DeviceSeam` (open, close, ioctl,
   mmap, signalling a thread); :class:`DeviceFileModel` is the model side.
   Conventions, chosen to match the raw system calls so that the real seam is a
   thin shim:

   * ``ioctl``, ``open`` and ``close`` return the non-negative result or
     ``-errno`` -- no exception on the per-exit path;
   * ``ioctl``'s ``arg`` is always an integer: the value itself, or the address of
     the argument struct, exactly what the kernel receives.  The model reads and
     writes the plugin's structs through :meth:`ModelCore.copy_from_user` /
     :meth:`ModelCore.copy_to_user`, which fault (``EFAULT``) on any pointer the
     process has not mapped (readable, or writable for a copy out);
   * ``mmap`` returns an :class:`mmap.mmap` or raises :class:`OSError`;
   * ``signal_thread`` is how a kick interrupts a vCPU blocked in the driver.

   A DLL-based hypervisor (WHPX) satisfies :class:`pyvmm.backend.seam.DllSeam`
   (``function(name)``, ``has(name)``, ``last_error()``); :class:`DllModel` is the
   model side.  Each export is a method marked :func:`exported` with its
   convention: ``"hresult"`` (a broken rule returns the rule's HRESULT),
   ``"bool"`` (``FALSE`` and the thread's last error) or ``"value"``.
   Out-parameters are written with :meth:`ModelCore.copy_to_user`; callbacks
   the plugin passes as cffi function pointers are called through
   :meth:`DllModel.callback`, and a callback that calls the DLL again is
   logged as a nested call (:attr:`CallRecord.parent`).
   A Windows driver reached with ``DeviceIoControl`` (HAXM on Windows) is a
   :class:`DeviceIoControlModel`: ``CreateFileW``/``DeviceIoControl``/
   ``CloseHandle`` with in and out buffers, the returned length and the Win32
   last error, dispatched to :func:`control` handlers of an
   :class:`IoControlObject`.

2. **Rules.**  Every constraint the interface documents is a :class:`Rule`:
   an id, the error code the real driver gives (an errno, or in
   :attr:`Rule.space` an HRESULT or Win32 code), a one-line summary and the
   **source** it comes from (a citation into the backend's notes
   ``docs/backends/<name>.md`` and the upstream driver file and function they
   summarise).  A handler enforces one with ``raise RuleViolation(RULE, "detail")``.
   The harness returns the rule's code to the caller, logs the call with the
   rule attached and appends a :class:`Rejection` to :attr:`ModelCore.rejections`, so

   * a test that runs the plugin through a full scenario asserts
     ``model.assert_no_rejections()`` -- the plugin broke no rule; and
   * a negative test makes one deliberately wrong call through the seam and
     asserts both the code and ``model.last_rejection.rule is RULE``.

   A rule with code 0 is *advisory*: the real driver accepts the call but the
   interface's documentation forbids it (Gunyah: memory after start).  The
   handler calls :meth:`ModelCore.advise`; the call succeeds and the rejection is
   still recorded.

   Results that are part of the normal protocol (``EINTR`` after a kick, a
   sticky status exit) are *not* rules: they are returned without a rejection.
   Something the model does not model raises :class:`ModelGap`, an
   ``AssertionError`` that fails the test instead of inventing an answer.

3. **Callers, threads and signals.**  Drivers tie objects to the process that
   made them (Gunyah: the VM creator's ``mm``).  :attr:`ModelCore.caller` is the
   identity of the current caller; ``with model.foreign_process():`` makes the
   calls inside come from another process, for ``EPERM`` rules.  A
   :class:`FileObject` records its creator in :attr:`FileObject.owner`.  Threads
   are identified by ``threading.get_ident()`` (every :class:`CallRecord` has its
   thread); :class:`ThreadAffinity` enforces "only the thread that created it"
   (HAXM and WHPX tie a vCPU to one thread) and :class:`ObjectMutex` a driver's
   per-object lock (Gunyah's vCPU ``run_lock``: a second thread's RUN waits,
   interruptibly).

   Signals follow the kernel: :meth:`ModelCore.post_signal` (what
   ``signal_thread`` does) wakes the thread's sleep (:meth:`ModelCore.sleep_until`)
   and calls :meth:`ModelCore.on_signal` so the model can stop a guest running on
   that thread.  A handler notices a pending signal with
   :meth:`ModelCore.signal_pending` and returns ``-EINTR`` or ``-ERESTARTSYS``
   (:data:`ERESTARTSYS`) *with whatever it already did kept* -- exactly the
   kernel's syscall-return semantics: ``-ERESTARTSYS`` reaches the caller as
   ``-EINTR`` unless the signal's handler was installed with ``SA_RESTART``
   (:attr:`ModelCore.sa_restart`), in which case the call is made again after the
   handler ran.  Every signal pending when a call returns is delivered then
   (:meth:`ModelCore.deliver_signals`), noticed or not.  A test makes a signal
   arrive at an exact point of a handler with :meth:`ModelCore.signal_at`; the
   model marks such points with :meth:`ModelCore.checkpoint`.

4. **The call log.**  Every seam call is a :class:`CallRecord` in
   :attr:`ModelCore.calls` (sequence number, operation, fd kind, request name,
   argument, result, rule, thread, and the enclosing call when it was made from
   inside another one -- a DLL callback calling the DLL again).  Tests assert on
   it -- e.g. that no register-setting request was ever issued.

5. **What the hypervisor reads.**  A hypervisor that configures the VM from a
   blob in guest memory (Gunyah's resource manager reads the device tree) is
   modelled by reading that blob at the moment the hypervisor does and parsing
   it (:meth:`ModelCore.read_config`, :func:`parse_device_tree`): the model then
   creates exactly what the blob names, and :attr:`ModelCore.configs` shows
   what was read.

6. **Memory the driver maps.**  :class:`SharedPage` is a page both the driver
   and the process map (a run page, via ``mmap`` of the fd).  Pages a driver
   maps into the process by itself (HAXM's tunnel and I/O buffer) are
   :class:`UserPages` made with :meth:`FileObject.map_user_pages`: they live as
   long as the file, and the last close unmaps them.

7. **Guest execution.**  :class:`GuestCpu` wraps one software CPU of
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
   :class:`~pyvmm.backend.host.HostSwitch` (or a DLL host), and every call goes
   through it.
3. Write the model as ``pyvmm_<name>/model.py`` in the plugin's package: one
   module-level :class:`Rule` per documented constraint (cite the notes and the
   driver function), a :class:`DeviceFileModel` subclass whose ``devices`` maps
   the device path to a :class:`FileObject` factory, and one :class:`FileObject`
   subclass per fd kind (device, VM, vCPU) with a ``@handles(REQUEST, "NAME")``
   method per ioctl -- or a :class:`DllModel` / :class:`DeviceIoControlModel`.
   Handlers unpack the argument with ``copy_from_user`` and ``struct``, never with
   the plugin's bindings: the model must not agree with the plugin by
   construction.  The model imports nothing of the plugin but its host switch.
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
   ``pyvmm_gunyah/model.py`` the model).
6. Mark the model's behaviour branches for the mutation script
   (``tools/mutate_model.py``) and show that the tests kill every mutant.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import functools
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pyvmm.backend.seam import DeviceSeam, DllSeam
from pyvmm.boot import VcpuInit
from pyvmm.errors import ErrorSpace, describe_code
from pyvmm.exits import InternalErrorExit, MmioExit, VcpuExit

if TYPE_CHECKING:
    from pyvmm.softcpu import Hypercall, SoftCpu
    from pyvmm.softcpu.gic import GicCpu

PAGE_SIZE = 4096

#: The caller identity of the test process itself.
SELF_PROCESS = "self"
#: The caller identity :meth:`ModelCore.foreign_process` switches to.
FOREIGN_PROCESS = "foreign"

#: The kernel-internal "restart this system call" code (``include/linux/errno.h``):
#: a handler returns ``-ERESTARTSYS`` when a signal interrupted it; the caller sees
#: ``-EINTR`` unless the signal handler has ``SA_RESTART``.
ERESTARTSYS = 512


# The seam protocols are production code: they live in the backend kit, and the
# models here implement them.
__all__ = ["DeviceSeam", "DllSeam"]


# --- rules, rejections, the call log ---------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One documented constraint of the interface.

    ``errno`` is what the real driver returns when the constraint is broken, in
    ``space`` (an errno for a device-file driver; an HRESULT or Win32 error code
    for a DLL or a Windows driver).  ``source`` cites where the rule comes from.
    """

    id: str
    errno: int
    summary: str
    source: str
    space: ErrorSpace = ErrorSpace.ERRNO

    def __str__(self) -> str:
        name = describe_code(self.errno, self.space)[0] if self.errno else "advisory"
        return f"{self.id} ({name}): {self.summary} [{self.source}]"


class RuleViolation(Exception):
    """Raised inside a handler to refuse a call; the harness turns it into the
    rule's error code for the caller."""

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
    op: str  # "open", "close", "ioctl", "mmap", "signal", "call", "callback", "control", ...
    target: str  # the fd kind ("gunyah-vm", ...) or the path/function
    name: str  # the request or function name
    arg: int
    caller: str
    thread: int
    result: int = 0
    rule: Rule | None = None
    #: The ``seq`` of the call this one was made from (a callback, or a DLL call a
    #: callback made), or None for a call straight from the plugin.
    parent: int | None = None
    #: How deep in such nesting: 0 for a call from the plugin.
    depth: int = 0

    @property
    def errno(self) -> int | None:
        return -self.result if self.result < 0 else None


@dataclass(frozen=True)
class Rejection:
    """A rule the caller broke, and the call that broke it."""

    rule: Rule
    detail: str
    call: CallRecord


@dataclass(frozen=True)
class ConfigRead:
    """A blob the hypervisor read from guest memory (a device tree, a config
    image), and what the model made of it."""

    kind: str
    address: int
    blob: bytes
    parsed: object


class ModelCore:
    """What every driver model has: rules, the call log, rejections, caller
    rights, threads and signals, user-memory access and interruptible sleeping."""

    #: How long a model vCPU may sleep (WFI, powered off) before the harness
    #: decides nothing will ever wake it and fails the test.
    sleep_limit: float = 10.0

    def __init__(self) -> None:
        self.calls: list[CallRecord] = []
        self.rejections: list[Rejection] = []
        self.configs: list[ConfigRead] = []
        self.caller: str = SELF_PROCESS
        self.lock = threading.RLock()
        #: Notified whenever something a sleeping vCPU may wait for happens.
        self.wakeup = threading.Condition(self.lock)
        #: Whether the process's signal handler was installed with ``SA_RESTART``:
        #: then a call that returns ``-ERESTARTSYS`` is made again instead of
        #: failing with ``EINTR``.  Python's ``signal.signal`` does not set it.
        self.sa_restart = False
        #: What a bad user pointer gives (``copy_from_user`` / ``copy_to_user``).
        self.bad_pointer_rule = EFAULT_RULE
        self._seq = 0
        self._signals: dict[int, int] = {}
        self._checkpoints: dict[str, list[Callable[[], None]]] = {}
        self._local = threading.local()

    # --- logging and rules ------------------------------------------------------
    def _stack(self) -> list[CallRecord]:
        stack: list[CallRecord] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def record(self, op: str, target: str, name: str, arg: int = 0) -> CallRecord:
        """Log a call that runs no model code of its own (a signal, an eventfd);
        it nests under the call the thread is in, if any."""
        stack = self._stack()
        parent = stack[-1] if stack else None
        with self.lock:
            self._seq += 1
            call = CallRecord(
                self._seq,
                op,
                target,
                name,
                arg,
                self.caller,
                threading.get_ident(),
                parent=parent.seq if parent else None,
                depth=parent.depth + 1 if parent else 0,
            )
            self.calls.append(call)
        self._local.last = call
        return call

    @contextlib.contextmanager
    def calling(self, op: str, target: str, name: str, arg: int = 0) -> Iterator[CallRecord]:
        """Log a call and make it the thread's current call while its handler runs:
        calls made inside it (a callback into the plugin, the plugin calling the DLL
        again) are recorded as nested under it."""
        call = self.record(op, target, name, arg)
        stack = self._stack()
        stack.append(call)
        try:
            yield call
        finally:
            stack.pop()

    @property
    def current_call(self) -> CallRecord | None:
        """The call the calling thread is in (for handlers that :meth:`advise`)."""
        stack = self._stack()
        if stack:
            return stack[-1]
        last: CallRecord | None = getattr(self._local, "last", None)
        return last

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
        """What an ``"hresult"`` or ``"value"`` :func:`exported` function returns for
        a broken ``rule``: the rule's HRESULT as a signed 32-bit value, else ``-errno``."""
        if rule.space is ErrorSpace.HRESULT:
            code = rule.errno & 0xFFFF_FFFF
            return code - (1 << 32) if code & 0x8000_0000 else code
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

        Read with ``process_vm_readv`` on this process, so any range the process
        has not mapped readable -- a null pointer, a freed buffer, a stale address
        -- is refused with :attr:`bad_pointer_rule` (``EFAULT``) instead of
        crashing, as ``copy_from_user`` refuses it.
        """
        if size == 0:
            return b""
        data = _user_memory().read(address, size)
        if data is None:
            raise RuleViolation(self.bad_pointer_rule, f"user pointer {address:#x}+{size:#x} is not mapped")
        return data

    def copy_to_user(self, address: int, data: bytes) -> None:
        """Write ``data`` to the caller at ``address``; a range the process has not
        mapped writable is refused with :attr:`bad_pointer_rule`."""
        if not data:
            return
        if not _user_memory().write(address, bytes(data)):
            raise RuleViolation(self.bad_pointer_rule, f"user pointer {address:#x}+{len(data):#x} is not writable")

    # --- what the hypervisor reads ---------------------------------------------------
    def read_config(self, kind: str, address: int, blob: bytes, parse: Callable[[bytes], object]) -> object:
        """The hypervisor reads ``blob`` (found at guest ``address``) and makes
        ``parse(blob)`` of it; recorded in :attr:`configs`.  ``parse`` raises
        :class:`ConfigBlobError` for a blob it cannot read; that propagates."""
        parsed = parse(bytes(blob))
        with self.lock:
            self.configs.append(ConfigRead(kind, address, bytes(blob), parsed))
        return parsed

    # --- signals, checkpoints and sleeping ---------------------------------------------
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

    def syscall_return(self, result: int) -> int | None:
        """What the caller gets for a handler's ``result`` as the call returns to
        user space: ``-ERESTARTSYS`` becomes ``-EINTR``, or None when the call is
        to be made again (``SA_RESTART``: the handler ran, the call restarts).  The
        pending signals are delivered either way."""
        if result != -ERESTARTSYS:
            return result
        self.deliver_signals()
        return None if self.sa_restart else -errno_mod.EINTR

    def at(self, name: str, action: Callable[[], None]) -> None:
        """Run ``action`` once, the next time a handler reaches checkpoint ``name``."""
        with self.lock:
            self._checkpoints.setdefault(name, []).append(action)

    def signal_at(self, name: str) -> None:
        """A signal arrives for the thread that next reaches checkpoint ``name``
        (a race a test could never time from outside)."""
        self.at(name, lambda: self.post_signal(threading.get_ident()))

    def checkpoint(self, name: str) -> None:
        """A handler reached point ``name``: run what :meth:`at` scheduled there."""
        if not self._checkpoints:
            return
        with self.lock:
            actions = self._checkpoints.pop(name, [])
        for action in actions:
            action()

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
                    raise ModelGap(f"a thread slept {self.sleep_limit}s waiting for {what}; nothing would wake it")
                self.wakeup.wait(left if poll is None else min(left, poll))

    def notify(self) -> None:
        """Wake sleepers to re-check their conditions."""
        with self.wakeup:
            self.wakeup.notify_all()


#: A user pointer the process has not mapped.
EFAULT_RULE = Rule(
    "EFAULT",
    errno_mod.EFAULT,
    "the argument pointer is not a valid user address",
    "copy_from_user()/copy_to_user(), every ioctl that takes a struct",
)


# --- threads -------------------------------------------------------------------------


class ThreadAffinity:
    """An object only one thread may use (HAXM and WHPX tie a vCPU to the thread
    that created it).  :meth:`check` raises ``rule`` from any other thread."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.thread = threading.get_ident()

    def rebind(self) -> None:
        """The calling thread becomes the owner (an interface that allows it)."""
        self.thread = threading.get_ident()

    def check(self, rule: Rule) -> None:
        me = threading.get_ident()
        if me != self.thread:
            raise RuleViolation(rule, f"{self.what} belongs to thread {self.thread}, called from {me}")


class ObjectMutex:
    """A driver's per-object mutex taken interruptibly (``mutex_lock_interruptible``):
    a second thread waits until the first releases it, and a signal ends the wait
    (the handler then returns ``-ERESTARTSYS``).  :attr:`holder` is the thread
    holding it."""

    def __init__(self, model: ModelCore, what: str) -> None:
        self.model = model
        self.what = what
        self.holder: int | None = None

    def acquire(self, *, interruptible: bool = True) -> bool:
        """True once the calling thread holds the mutex; False if a signal came
        first.  ``interruptible=False`` is ``mutex_lock``: signals do not end the
        wait.  Waiting longer than the model's sleep limit fails the test."""
        me = threading.get_ident()

        def take() -> bool:
            if self.holder is None:
                self.holder = me
                return True
            return False

        what = f"{self.what} (held by thread {self.holder})"
        if interruptible:
            return self.model.sleep_until(take, what)
        deadline = time.monotonic() + self.model.sleep_limit
        with self.model.wakeup:
            while not take():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ModelGap(f"a thread waited {self.model.sleep_limit}s for {what}")
                self.model.wakeup.wait(min(left, 0.01))
        return True

    def release(self) -> None:
        with self.model.lock:
            self.holder = None
        self.model.notify()

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """``with mutex.held() as taken:`` -- released on leaving if taken."""
        taken = self.acquire()
        try:
            yield taken
        finally:
            if taken:
                self.release()


# --- user memory ------------------------------------------------------------------


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _UserMemory:
    """This process's memory, read and written the way the kernel does it for a
    system call: ``process_vm_readv``/``process_vm_writev`` on our own pid fail
    with ``EFAULT`` on an unmapped (or, for writes, read-only) range instead of
    crashing the process."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        signature = (
            ctypes.c_int,
            ctypes.POINTER(_Iovec),
            ctypes.c_ulong,
            ctypes.POINTER(_Iovec),
            ctypes.c_ulong,
            ctypes.c_ulong,
        )
        self._read = libc.process_vm_readv
        self._write = libc.process_vm_writev
        for function in (self._read, self._write):
            function.restype = ctypes.c_ssize_t
            function.argtypes = signature
        self._pid = os.getpid()

    def _transfer(self, function: Any, address: int, buffer: Any, size: int) -> bool:
        if address <= 0 or address + size > 1 << 64:
            return False
        if self._pid != os.getpid():  # forked since: our own pid changed
            self._pid = os.getpid()
        local = _Iovec(ctypes.addressof(buffer), size)
        remote = _Iovec(address, size)
        return int(function(self._pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)) == size

    def read(self, address: int, size: int) -> bytes | None:
        buffer = ctypes.create_string_buffer(size)
        return buffer.raw if self._transfer(self._read, address, buffer, size) else None

    def write(self, address: int, data: bytes) -> bool:
        buffer = ctypes.create_string_buffer(data, len(data))
        return self._transfer(self._write, address, buffer, len(data))


_user_memory_instance: _UserMemory | None = None


def _user_memory() -> _UserMemory:
    global _user_memory_instance
    if _user_memory_instance is None:
        _user_memory_instance = _UserMemory()
    return _user_memory_instance


def user_address_mapped(address: int, size: int = 1) -> bool:
    """Whether the process can read ``size`` bytes at ``address``."""
    return _user_memory().read(address, size) is not None


class UserPages:
    """Pages a driver maps into the calling process by itself (HAXM's tunnel and
    I/O buffer), at :attr:`address`.  They stay mapped until :meth:`unmap` --
    which the harness calls when the file that made them is closed for the last
    time, as the driver does at release."""

    def __init__(self, size: int, name: str = "pyvmm-driver-pages") -> None:
        self.size = (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        self.name = name
        self.mapping: mmap.mmap | None = mmap.mmap(-1, self.size)
        anchor = ctypes.c_char.from_buffer(self.mapping)
        self.address = ctypes.addressof(anchor)
        del anchor

    @property
    def mapped(self) -> bool:
        return self.mapping is not None

    def unmap(self) -> bool:
        """Unmap the pages; False if a view of them is still held in Python (they
        then stay mapped until it goes)."""
        if self.mapping is None:
            return True
        try:
            self.mapping.close()
        except BufferError:
            return False
        self.mapping = None
        return True


#: The caller still holds a view of pages the driver unmaps at close.
PAGES_HELD = Rule(
    "DRIVER-PAGES-HELD",
    0,
    "pages the driver mapped into the process are still in use when their file is closed",
    "the driver unmaps them at release; a later access faults",
)


# --- what the hypervisor reads: device trees ----------------------------------------------


class ConfigBlobError(ValueError):
    """The blob the hypervisor reads is not what it expects (not a device tree)."""


@dataclass(frozen=True)
class DeviceTreeBlob:
    """A parsed flattened device tree: every node by path, with its properties'
    raw (big-endian) values, read independently of any writer in pyvmm."""

    nodes: dict[str, dict[str, bytes]]

    def has(self, path: str) -> bool:
        return path in self.nodes

    def children(self, path: str) -> list[str]:
        """The paths of the direct subnodes of ``path``, in tree order."""
        prefix = "/" if path == "/" else path + "/"
        return [p for p in self.nodes if p.startswith(prefix) and p != path and "/" not in p[len(prefix) :]]

    def prop(self, path: str, name: str) -> bytes | None:
        return self.nodes.get(path, {}).get(name)

    def u32(self, path: str, name: str) -> int | None:
        raw = self.prop(path, name)
        return struct.unpack(">I", raw[:4])[0] if raw is not None and len(raw) >= 4 else None

    def strings(self, path: str, name: str) -> list[str]:
        raw = self.prop(path, name)
        if not raw:
            return []
        return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]

    def string(self, path: str, name: str) -> str | None:
        values = self.strings(path, name)
        return values[0] if values else None


def parse_device_tree(blob: bytes) -> DeviceTreeBlob:
    """Parse a DTB with the ``fdt`` package; trailing bytes after the header's
    ``totalsize`` are ignored.

    :raises ConfigBlobError: no ``0xd00dfeed`` magic, or the structure does not parse.
    """
    import fdt

    if len(blob) < 40 or blob[:4] != b"\xd0\x0d\xfe\xed":
        raise ConfigBlobError("not a flattened device tree (no 0xd00dfeed magic)")
    total = struct.unpack_from(">I", blob, 4)[0]
    if total > len(blob):
        raise ConfigBlobError(f"the device tree says it is {total:#x} bytes, only {len(blob):#x} were read")
    try:
        tree = fdt.parse_dtb(bytes(blob[:total]))
    except Exception as exc:  # the parser raises whatever it hits
        raise ConfigBlobError(f"not a valid flattened device tree: {exc}") from exc
    nodes: dict[str, dict[str, bytes]] = {}
    # Depth first in blob order (fdt's own walk() reverses siblings): a
    # hypervisor that numbers nodes by position sees them in this order.
    pending: list[tuple[str, Any]] = [("/", tree.root)]
    while pending:
        path, node = pending.pop()
        nodes[path] = {prop.name: _raw_property(prop, fdt) for prop in node.props}
        prefix = "" if path == "/" else path
        pending.extend((f"{prefix}/{child.name}", child) for child in reversed(node.nodes))
    return DeviceTreeBlob(nodes)


def _raw_property(prop: Any, fdt: Any) -> bytes:
    if isinstance(prop, fdt.PropWords):
        return b"".join(struct.pack(">I", word) for word in prop.data)
    if isinstance(prop, fdt.PropStrings):
        return b"".join(text.encode() + b"\0" for text in prop.data)
    if isinstance(prop, fdt.PropBytes):
        return bytes(prop.data)
    return b""


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
        self.user_pages: list[UserPages] = []

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

    def map_user_pages(self, size: int, name: str = "") -> UserPages:
        """Pages the driver maps into the caller for this file; unmapped at the
        file's last close."""
        pages = UserPages(size, name or f"{self.kind}-pages")
        self.user_pages.append(pages)
        return pages

    def release(self) -> None:
        """The last close of the fd (subclasses extend it)."""

    def release_user_pages(self) -> None:
        for pages in self.user_pages:
            if not pages.unmap():
                self.model.advise(PAGES_HELD, f"{pages.name} at {pages.address:#x}")
        self.user_pages.clear()


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
        with self.calling("open", path, "open", flags) as call:
            factory = self.devices.get(path)
            if factory is None:
                return self.reject(call, RuleViolation(NO_DEVICE, path))
            call.result = self.install(factory(self))
            return call.result

    def close(self, fd: int) -> int:
        obj = self.files.get(fd)
        with self.calling("close", obj.kind if obj else "?", "close", fd) as call:
            if obj is None:
                return self.reject(call, RuleViolation(BAD_FD, f"fd {fd}"))
            with self.lock:
                del self.files[fd]
            os.close(fd)
            obj.closed = True
            obj.release()
            obj.release_user_pages()
            return 0

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        obj = self.files.get(fd)
        kind = obj.kind if obj is not None else "?"
        with self.calling("ioctl", kind, obj.ioctl_name(request) if obj else f"ioctl {request:#x}", arg) as call:
            try:
                while True:
                    if obj is None:
                        raise RuleViolation(BAD_FD, f"fd {fd}")
                    returned = self.syscall_return(obj.dispatch(request, arg))
                    if returned is not None:
                        break
            except RuleViolation as violation:
                return self.reject(call, violation)
            finally:
                self.deliver_signals()
            call.result = returned
            return returned

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        obj = self.files.get(fd)
        with self.calling("mmap", obj.kind if obj else "?", "mmap", offset) as call:
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

#: How an :func:`exported` function reports a broken rule.
CONVENTIONS = ("hresult", "bool", "handle", "value")


def exported(name: str, convention: str = "hresult") -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """Mark a method of a :class:`ModelCore` subclass as DLL function ``name``.

    The call is logged (nested under the thread's current call when a callback
    makes it) and a :class:`RuleViolation` becomes what the function's
    ``convention`` says: ``"hresult"`` and ``"value"`` return
    ``self.error_value(rule)``; ``"bool"`` returns 0 (``FALSE``) and
    ``"handle"`` returns ``INVALID_HANDLE_VALUE``, both setting the thread's
    last error to the rule's code (:meth:`DllModel.set_last_error`).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, not {convention!r}")

    def wrap(method: Callable[..., _R]) -> Callable[..., _R]:
        @functools.wraps(method)
        def call(self: Any, *args: Any) -> Any:
            first = args[0] if args else 0
            with self.calling("call", name, name, first if isinstance(first, int) else 0) as record:
                try:
                    result = method(self, *args)
                except RuleViolation as violation:
                    self.reject(record, violation)
                    if convention in ("bool", "handle"):
                        self.set_last_error(violation.rule.errno)
                        failed = 0 if convention == "bool" else INVALID_HANDLE_VALUE
                        record.result = failed
                        return failed
                    value = self.error_value(violation.rule)
                    record.result = value
                    return value
                record.result = result if isinstance(result, int) else 0
                return result

        call.__dict__["_export"] = name
        return call

    return wrap


def pointer_value(value: Any) -> int:
    """The address a DLL receives for ``value``: an int, None (NULL), a ctypes
    object or ``byref()``, or a cffi pointer."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    obj = getattr(value, "_obj", None)  # ctypes.byref(x)
    if obj is not None:
        return ctypes.addressof(obj)
    if isinstance(value, ctypes.c_void_p):
        return int(value.value or 0)
    if isinstance(value, ctypes._Pointer):
        return int(ctypes.cast(value, ctypes.c_void_p).value or 0)
    with contextlib.suppress(TypeError):
        return ctypes.addressof(value)
    from pyvmm.backend.host import address_of

    return address_of(value)


class DllModel(ModelCore):
    """A model of a hypervisor DLL; satisfies :class:`~pyvmm.backend.seam.DllSeam`.

    Its exports are the methods marked :func:`exported`; :meth:`function` hands
    them out by name.  :attr:`missing` names exports this build of the DLL lacks
    (an older Windows): ``has`` answers False and ``function`` raises KeyError.
    """

    #: Exports this "build" does not have.
    missing: frozenset[str] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self.bad_pointer_rule = E_POINTER_RULE
        self._exports: dict[str, Callable[..., Any]] = {}
        for klass in reversed(type(self).__mro__):
            for attr, value in vars(klass).items():
                export = getattr(value, "_export", None)
                if export is not None:
                    self._exports[export] = getattr(self, attr)
        self._last_error = threading.local()
        self._ffi: Any = None

    # --- DllSeam ----------------------------------------------------------------------
    def function(self, name: str) -> Any:
        if name in self.missing:
            raise KeyError(name)
        return self._exports[name]

    def has(self, name: str) -> bool:
        return name in self._exports and name not in self.missing

    def last_error(self) -> int:
        return int(getattr(self._last_error, "value", 0))

    def set_last_error(self, code: int) -> None:
        """``SetLastError`` for the calling thread."""
        self._last_error.value = code

    # --- out-parameters and callbacks -----------------------------------------------
    def write_out(self, pointer: Any, fmt: str, *values: Any) -> None:
        """Write an out-parameter: ``struct.pack(fmt, *values)`` at ``pointer``
        (NULL or unmapped: :attr:`bad_pointer_rule`)."""
        self.copy_to_user(pointer_value(pointer), struct.pack(fmt, *values))

    def read_in(self, pointer: Any, fmt: str) -> tuple[Any, ...]:
        """Read an in-parameter struct at ``pointer`` with ``fmt``."""
        return struct.unpack(fmt, self.copy_from_user(pointer_value(pointer), struct.calcsize(fmt)))

    @property
    def ffi(self) -> Any:
        """The model's own cffi FFI (declare the callback types there with
        ``model.ffi.cdef``, never with the plugin's bindings)."""
        if self._ffi is None:
            import cffi

            self._ffi = cffi.FFI()
        return self._ffi

    def callback(self, pointer: Any, ctype: str, name: str = "callback") -> Callable[..., Any]:
        """A callable for the C function pointer ``pointer`` (an address or a cffi
        pointer) of type ``ctype`` (e.g. ``"int32_t (*)(void *, uint32_t)"``).
        Each call is logged as ``op="callback"``, nested under the export that
        makes it; calls the callback makes into the DLL nest under it."""
        address = pointer_value(pointer)
        if not address:
            raise RuleViolation(self.bad_pointer_rule, f"{name}: a NULL callback")
        function = self.ffi.cast(ctype, address)

        def invoke(*args: Any) -> Any:
            with self.calling("callback", name, name, address) as record:
                result = function(*args)
                if isinstance(result, int):
                    record.result = result
                return result

        return invoke


#: A bad pointer given to an HRESULT function (``E_POINTER``, "Error Handling in COM").
E_POINTER_RULE = Rule(
    "E_POINTER",
    0x8000_4003,
    "an invalid pointer was passed",
    "COM error conventions: E_POINTER for an invalid pointer argument",
    space=ErrorSpace.HRESULT,
)


# --- Windows drivers through DeviceIoControl -----------------------------------------------

INVALID_HANDLE_VALUE = (1 << 64) - 1 if ctypes.sizeof(ctypes.c_void_p) == 8 else (1 << 32) - 1
ERROR_FILE_NOT_FOUND = 2
ERROR_INVALID_HANDLE = 6
ERROR_INVALID_FUNCTION = 1
ERROR_NOACCESS = 998

#: ``DeviceIoControl`` on a handle that is not open.
BAD_HANDLE = Rule(
    "ERROR_INVALID_HANDLE",
    ERROR_INVALID_HANDLE,
    "not an open handle",
    "ObReferenceObjectByHandle (STATUS_INVALID_HANDLE -> ERROR_INVALID_HANDLE)",
    space=ErrorSpace.WIN32,
)
NO_SUCH_CONTROL = Rule(
    "ERROR_INVALID_FUNCTION",
    ERROR_INVALID_FUNCTION,
    "the device has no such control code",
    "a driver's IRP_MJ_DEVICE_CONTROL default case (STATUS_INVALID_DEVICE_REQUEST -> ERROR_INVALID_FUNCTION)",
    space=ErrorSpace.WIN32,
)
NO_SUCH_DEVICE = Rule(
    "ERROR_FILE_NOT_FOUND",
    ERROR_FILE_NOT_FOUND,
    "no such device",
    "CreateFileW of a device name that does not exist",
    space=ErrorSpace.WIN32,
)
BAD_BUFFER = Rule(
    "ERROR_NOACCESS",
    ERROR_NOACCESS,
    "an in or out buffer the caller cannot access",
    "the I/O manager's probe of the caller's buffers (STATUS_ACCESS_VIOLATION -> ERROR_NOACCESS)",
    space=ErrorSpace.WIN32,
)


def control(code: int, name: str) -> Callable[[Callable[..., bytes]], Callable[..., bytes]]:
    """Mark an :class:`IoControlObject` method as the handler of control ``code``.
    It takes the input bytes and the out buffer's size and returns the output
    bytes (at most that size), or raises a :class:`RuleViolation` (Win32 space)."""

    def mark(method: Callable[..., bytes]) -> Callable[..., bytes]:
        method.__dict__["_control"] = (code, name)
        return method

    return mark


class IoControlObject:
    """What an open handle of a :class:`DeviceIoControlModel` refers to; marks
    handlers with :func:`control`."""

    kind: ClassVar[str] = "device"
    _controls: ClassVar[dict[int, tuple[str, str]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[int, tuple[str, str]] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                mark = getattr(value, "_control", None)
                if mark is not None:
                    table[mark[0]] = (attr, mark[1])
        cls._controls = table

    def __init__(self, model: DeviceIoControlModel) -> None:
        self.model = model
        self.handle = 0
        self.user_pages: list[UserPages] = []

    @classmethod
    def control_name(cls, code: int) -> str:
        entry = cls._controls.get(code)
        return entry[1] if entry else f"control {code:#x}"

    def dispatch(self, code: int, data: bytes, out_size: int) -> bytes:
        entry = self._controls.get(code)
        if entry is None:
            raise RuleViolation(NO_SUCH_CONTROL, f"{self.kind} has no control {code:#x}")
        method: Callable[[bytes, int], bytes] = getattr(self, entry[0])
        return method(data, out_size)

    def map_user_pages(self, size: int, name: str = "") -> UserPages:
        pages = UserPages(size, name or f"{self.kind}-pages")
        self.user_pages.append(pages)
        return pages

    def release(self) -> None:
        """``CloseHandle`` of the last handle (subclasses extend it)."""


class DeviceIoControlModel(DllModel):
    """A Windows driver as the process reaches it: ``CreateFileW``,
    ``DeviceIoControl`` and ``CloseHandle`` through the DLL seam (what kernel32
    exports).  :attr:`devices` maps a device name (``\\\\.\\HAX``) to a factory
    of its :class:`IoControlObject`."""

    def __init__(self) -> None:
        super().__init__()
        self.bad_pointer_rule = BAD_BUFFER
        self.devices: dict[str, Callable[[DeviceIoControlModel], IoControlObject]] = {}
        self.handles: dict[int, IoControlObject] = {}
        self._next_handle = 0x100

    def install(self, obj: IoControlObject) -> int:
        """A new handle for ``obj`` (a driver returning a new object, e.g. a VM)."""
        with self.lock:
            self._next_handle += 4
            obj.handle = self._next_handle
            self.handles[obj.handle] = obj
        return obj.handle

    @exported("CreateFileW", "handle")
    def create_file(self, path: str, *rest: Any) -> int:
        """``CreateFileW(path, access, share, security, disposition, flags, template)``:
        only the path matters to the model."""
        factory = self.devices.get(path)
        if factory is None:
            raise RuleViolation(NO_SUCH_DEVICE, path)
        return self.install(factory(self))

    @exported("DeviceIoControl", "bool")
    def device_io_control(  # noqa: PLR0917 - DeviceIoControl's own eight arguments
        self,
        handle: int,
        code: int,
        in_buffer: Any,
        in_size: int,
        out_buffer: Any,
        out_size: int,
        returned: Any,
        overlapped: Any = None,
    ) -> int:
        obj = self.handles.get(int(handle))
        if obj is None:
            raise RuleViolation(BAD_HANDLE, f"handle {handle:#x}")
        call = self.current_call
        if call is not None:
            call.name = obj.control_name(code)
            call.target = obj.kind
        if overlapped is not None and pointer_value(overlapped):
            raise self.not_modelled("overlapped DeviceIoControl")
        data = self.copy_from_user(pointer_value(in_buffer), in_size) if in_size else b""
        output = obj.dispatch(code, data, out_size)
        if len(output) > out_size:
            raise ModelGap(f"{obj.control_name(code)} answered {len(output)} bytes for an out buffer of {out_size}")
        if output:
            self.copy_to_user(pointer_value(out_buffer), output)
        if pointer_value(returned):
            self.copy_to_user(pointer_value(returned), struct.pack("<I", len(output)))
        return 1

    @exported("CloseHandle", "bool")
    def close_handle(self, handle: int) -> int:
        obj = self.handles.pop(int(handle), None)
        if obj is None:
            raise RuleViolation(BAD_HANDLE, f"handle {handle:#x}")
        obj.release()
        for pages in obj.user_pages:
            if not pages.unmap():
                self.advise(PAGES_HELD, f"{pages.name} at {pages.address:#x}")
        obj.user_pages.clear()
        return 1


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

    def mapped(self, gpa: int) -> bool:
        """Whether guest-physical ``gpa`` is RAM for the engine."""
        return self.engine.read_physical(gpa, 1) is not None

    def init(self, boot: VcpuInit) -> None:
        self.engine.init(boot)

    def run(self) -> VcpuExit:
        exit_ = self.engine.run()
        self._last = exit_
        return exit_

    @property
    def pending_read(self) -> MmioExit | None:
        """The MMIO read the guest waits on, if the last exit was one."""
        last = self._last
        return last if isinstance(last, MmioExit) and not last.is_write else None

    def complete_read(self, data: bytes) -> None:
        """Hand ``data`` to the guest's pending MMIO read (taken by the next :meth:`run`)."""
        last = self.pending_read
        if last is None:
            raise ModelGap("an MMIO read completion without a pending MMIO read")
        last.data[: last.size] = data[: last.size].ljust(last.size, b"\0")

    def fetch_fault(self, exit_: VcpuExit) -> int | None:
        """The guest-physical address of an instruction fetch that no memory backs,
        if that is what ended the run (the PC is left on it), else None."""
        if not isinstance(exit_, InternalErrorExit):
            return None
        pc = self.engine.pc
        return pc if self.engine.read_physical(pc, 4) is None else None

    def attach_gic(self, cpu: GicCpu) -> None:
        """aarch64: connect the vCPU to its GICv3 redistributor, CPU interface and
        virtual timer (:meth:`pyvmm.softcpu.SoftCpu.attach_gic`); the model routes
        the GIC's MMIO itself."""
        self.engine.attach_gic(cpu)

    def irq_signalled(self) -> bool:
        """aarch64: whether the attached GIC signals an interrupt to this vCPU
        (what wakes WFI); False without a GIC."""
        return self.engine.irq_signalled()

    def kick(self) -> None:
        """From any thread: end the current or next :meth:`run` with an interrupted exit."""
        self.engine.kick()

    def discard_kick(self) -> bool:
        """Forget a kick made while the guest was not running (a signal the driver
        has since delivered); True if there was one.  Call it, then re-check what
        the kick was for: a kick that comes later still ends the next run."""
        return bool(self.engine._take_kick())

    def close(self) -> None:
        self.engine.close()
