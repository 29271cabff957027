"""The exits the software CPU adds to :mod:`pyvmm.exits`.

Each is a subclass of a core exit, with that exit's ``kind``, so a run loop that
dispatches on ``kind`` handles it as the core exit; the fields added here are
for owners that asked for the behaviour (an ``intercept`` or a
``string_batch`` of :class:`~pyvmm.softcpu.SoftCpu`) -- driver models above
all, which turn them into their hypervisor's exit structures.  Like every
exit, one instance per vCPU is refilled by each run.
"""

from __future__ import annotations

from pyvmm.exits import GenericExit, IoExit, OtherExit


class RdtscExit(GenericExit):
    """An x86 ``RDTSC`` or ``RDTSCP`` (``SoftCpu(intercept=["rdtsc"])``), taken
    after the instruction.  ``kind`` is :attr:`~pyvmm.exits.ExitKind.OTHER`,
    ``which`` :attr:`~pyvmm.exits.OtherExit.RDTSC`.

    Answer before the next run: ``tsc`` goes to EDX:EAX, and for RDTSCP ``aux``
    (prefilled with the guest's IA32_TSC_AUX) to ECX.  ``tsc`` starts at 0: the
    software CPU keeps no time of its own to offer."""

    __slots__ = ("aux", "rdtscp", "tsc")

    def __init__(self) -> None:
        super().__init__(OtherExit.RDTSC)
        self.rdtscp = False
        self.tsc = 0
        self.aux = 0


class StringIoExit(IoExit):
    """A batch of ``INS``/``OUTS`` items (``SoftCpu(string_batch=N)``): ``count``
    items of ``size`` bytes, in the order the instruction transfers them, in
    ``data``.  ``df`` is RFLAGS.DF: False, the guest buffer ascends from
    ``gva``; True, it descends (item ``k`` is at ``gva - k * size``).  ``gva``
    is the guest-linear address of the first item (segment base included),
    ``gpa`` its guest-physical address; the whole batch lies in that one page.

    For ``OUTS`` (``is_write``) ``data`` holds the items read from the buffer;
    for ``INS`` the VMM fills it.  The next run completes the batch: the items
    go to guest memory (``INS``), RSI/RDI move by ``count * size`` (down when
    ``df``), a REP prefix's RCX drops by ``count``, and RIP moves past the
    instruction once it is done -- with a REP count left, RIP stays on it and
    the next item makes the next batch."""

    __slots__ = ("df", "gpa", "gva")

    def __init__(self) -> None:
        super().__init__()
        self.df = False
        self.gva = 0
        self.gpa = 0
