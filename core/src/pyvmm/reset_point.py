"""Dirty-page reset: put a VM back to a saved point, copying only the pages the
guest wrote since.

A fuzzer runs the same guest from the same state thousands of times a second,
each time with a new input.  Restoring all of guest memory every iteration costs
time proportional to the RAM; restoring only what the last iteration wrote costs
time proportional to what it touched.  The hypervisor's dirty log says which
pages those are (``DIRTY_LOG``; KVM clears the log as it hands it over), so::

    point = ResetPoint.capture(vm)     # every RAM region mapped log_dirty=True
    for data in inputs:
        point.write(INPUT, data)       # not vm.memory.write: see below
        exit_ = vcpu.run()             # ... until the guest reports or crashes
        point.reset()                  # dirty pages and vCPU registers back

A reset copies each run of consecutive dirty pages back from the saved copy in
one slice assignment (a ``memcpy``) and writes the saved vCPU state back from
what :meth:`pyvmm.vm.Vcpu.prepare_state` made of it at the capture (on KVM, the
``KVM_SET_*`` structs, filled once: a reset costs the ioctls alone).
What it covers: guest RAM, and per vCPU the register sets of ``kinds`` (by
default, x86: general, segment/control, FPU/SSE and debug registers -- the whole
XSAVE area in place of the FPU where the backend declares ``XSAVE`` -- plus XCRs
where the backend declares ``XCRS``; aarch64: the core registers), the pending
events where the backend declares ``VCPU_EVENTS``, and the MSRs the backend
lists (``MSRS`` and ``MSR_INDEX_LIST``) that the vCPU can have written back
(:func:`restorable_msrs`).  What it does not: in-kernel interrupt controller,
PIT and clock state, and the state of the VMM's own devices -- a harness whose guest uses them
must reset them itself.  Pass ``kinds`` to add ``LAPIC``/``MP_STATE`` for a VM
with an in-kernel irqchip.

The dirty log sees the *guest's* writes only: the hypervisor tracks them in its
page tables, and a write the VMM makes through its own mapping of guest RAM is
invisible to it (KVM: ``mark_page_dirty()`` runs on guest accesses, never on
user-space stores).  So a harness writes its inputs with :meth:`ResetPoint.write`,
which records the pages it touches for the next reset::

        point.write(INPUT, data)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm.arch.x86_64 import MsrEntry
from pyvmm.capabilities import Capability
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.errors import ConfigError, MsrAccessError, VmStateError
from pyvmm.exits import ExitKind
from pyvmm.memory import RamRegion
from pyvmm.prepared_state import PreparedVcpuState, SavedVcpuState
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Vcpu, Vm

X86_KINDS = (StateKind.REGS, StateKind.SREGS, StateKind.FPU, StateKind.DEBUG_REGS)
AARCH64_KINDS = (StateKind.CORE_REGS,)


@dataclass
class _SavedRegion:
    region: RamRegion
    #: A view, so that slicing it copies nothing (slicing bytes would copy).
    contents: memoryview


def settle(vm: Vm) -> None:
    """Let every vCPU of ``vm`` finish what its last exit left to the hypervisor,
    without running guest code, before its state is read or written.

    KVM completes a port or MMIO exit -- the RIP past an OUT, the data of an IN,
    a string instruction's next item -- only on the next ``KVM_RUN``
    (``Documentation/virt/kvm/api.rst``, ``KVM_EXIT_IO``: "userspace should ensure
    that the operation is completed before performing a live migration ... with
    the immediate_exit field set").  State read before that is mid-instruction: a
    snapshot taken at an OUT exit restored the OUT and ran it twice, on upstream
    KVM (this machine's software KVM advances RIP at the exit and hid it).  A kick
    before a run is that re-entry: the run completes the pending operation and
    returns interrupted.  A backend without ``IMMEDIATE_EXIT`` cannot be kicked:
    its exits are taken as complete when they are reported.

    :raises VmStateError: a vCPU ran into another exit instead of stopping.
    """
    if not vm.backend.supports(Capability.IMMEDIATE_EXIT):
        return
    for vcpu in vm.vcpus:
        vcpu.kick()
        exit_ = vcpu.run()
        if exit_.kind is not ExitKind.INTERRUPTED:
            raise VmStateError(
                f"vCPU {vcpu.index}: a kicked run should stop before the guest runs, but it exited with "
                f"{exit_.kind.name}: its state cannot be saved or restored consistently"
            )


def saves_msrs(vm: Vm) -> bool:
    """Whether resets and snapshots of ``vm`` carry MSRs: x86 backends that
    can list and move them (``MSRS`` and ``MSR_INDEX_LIST``)."""
    caps = vm.backend.capabilities
    return vm.config.arch is Arch.X86_64 and Capability.MSRS in caps and Capability.MSR_INDEX_LIST in caps


def restorable_msrs(vcpu: Vcpu, indices: Sequence[int]) -> list[MsrEntry]:
    """The MSRs of ``indices`` that ``vcpu`` can both read and have written
    back, with their values now.

    The hypervisor's list names MSRs some VMs cannot take (KVM lists its
    paravirtual MSRs whether or not the guest's CPUID offers them, and refuses
    a write to one the guest was not given): each is tried once here, writing
    back the value just read, so that a reset or a restore never meets a
    refusal and never skips an MSR silently.
    """
    try:
        entries = vcpu.get_msrs(list(indices))
    except MsrAccessError:
        entries = []
        for index in indices:
            try:
                entries += vcpu.get_msrs([index])
            except MsrAccessError:
                continue
    kept = []
    for entry in entries:
        try:
            vcpu.set_msrs([entry])
        except MsrAccessError:
            continue
        kept.append(entry)
    return kept


def default_kinds(vm: Vm) -> tuple[StateKind, ...]:
    """The register sets a reset restores by default for ``vm``'s backend and arch."""
    if vm.config.arch is Arch.AARCH64:
        return AARCH64_KINDS
    kinds: tuple[StateKind, ...] = X86_KINDS
    if vm.backend.supports(Capability.XSAVE):
        # The XSAVE area holds the legacy FPU/SSE state and the AVX and later
        # registers a guest may also change: one write instead of FPU's, no less.
        kinds = tuple(StateKind.XSAVE if kind is StateKind.FPU else kind for kind in kinds)
    extra = (StateKind.XCRS,) if vm.backend.supports(Capability.XCRS) else ()
    return kinds + extra


def _saved_state(
    vcpu: Vcpu, kinds: Sequence[StateKind], with_events: bool, msr_indices: Sequence[int] | None
) -> SavedVcpuState:
    """``vcpu``'s state now: what a reset writes back to it."""
    return SavedVcpuState(
        tuple((kind, vcpu.get_state(kind)) for kind in kinds),
        () if msr_indices is None else tuple(restorable_msrs(vcpu, msr_indices)),
        vcpu.get_events() if with_events else None,
    )


class ResetPoint:
    """A VM's memory and vCPU registers at one moment, to reset to cheaply."""

    def __init__(self, vm: Vm, regions: list[_SavedRegion], vcpus: list[PreparedVcpuState]) -> None:
        self.vm = vm
        self._regions = regions
        self._vcpus = vcpus
        #: Pages the VMM wrote through :meth:`write`, per saved region.
        self._vmm_dirty: dict[int, set[int]] = {}

    def write(self, gpa: int, data: bytes) -> None:
        """Write ``data`` into guest RAM at ``gpa`` and have the next reset
        restore the pages it touches (the dirty log does not see VMM writes).

        :raises GuestMemoryError: the range is not inside one RAM region.
        """
        self.vm.memory.write(gpa, data)
        if not data:
            return
        for index, saved in enumerate(self._regions):
            region = saved.region
            if region.guest_phys_addr <= gpa < region.end:
                offset = gpa - region.guest_phys_addr
                pages = range(offset // PAGE_SIZE, (offset + len(data) - 1) // PAGE_SIZE + 1)
                self._vmm_dirty.setdefault(index, set()).update(pages)
                return

    @classmethod
    def capture(cls, vm: Vm, kinds: Sequence[StateKind] | None = None) -> ResetPoint:
        """Save ``vm`` as it is now and start its dirty log afresh.  Call it
        (and :meth:`reset`) on the thread that created the vCPUs.

        :raises UnsupportedCapability: the backend lacks ``DIRTY_LOG`` or
            ``VCPU_REGISTERS``.
        :raises ConfigError: a RAM region is not dirty-logged (its changes
            could not be found), or the VM has no RAM.
        """
        vm.backend.require(Capability.DIRTY_LOG, "a dirty-page reset")
        vm.backend.require(Capability.VCPU_REGISTERS, "a dirty-page reset")
        regions = list(vm.memory)
        if not regions:
            raise ConfigError("a reset point needs guest RAM; the VM has none")
        unlogged = [f"{r.guest_phys_addr:#x}+{r.size:#x}" for r in regions if not r.log_dirty]
        if unlogged:
            raise ConfigError(
                f"a reset point needs every RAM region mapped with log_dirty=True; not: {', '.join(unlogged)}"
            )
        chosen = tuple(default_kinds(vm) if kinds is None else kinds)
        with_events = vm.backend.supports(Capability.VCPU_EVENTS) and vm.config.arch is Arch.X86_64
        msr_indices = vm.msr_index_list() if saves_msrs(vm) else None
        settle(vm)
        saved_vcpus = [vcpu.prepare_state(_saved_state(vcpu, chosen, with_events, msr_indices)) for vcpu in vm.vcpus]
        saved_regions = []
        for region in regions:
            vm.dirty_log(region)  # from here on, the log holds exactly what changed
            saved_regions.append(_SavedRegion(region, memoryview(bytes(region.view()))))
        return cls(vm, saved_regions, saved_vcpus)

    def reset(self) -> int:
        """Copy back every page written since the capture or the last reset, and
        set the saved registers again; the number of pages copied."""
        vm = self.vm
        # What the last exit left pending lands now, in the dirty log, and is undone.
        settle(vm)
        pages = 0
        vmm_dirty, self._vmm_dirty = self._vmm_dirty, {}
        for index, saved in enumerate(self._regions):
            bitmap = vm.dirty_log(saved.region)
            touched = vmm_dirty.get(index)
            if touched:
                merged = bytearray(bitmap)
                for page in touched:
                    merged[page >> 3] |= 1 << (page & 7)
                bitmap = bytes(merged)
            view = saved.region.view()
            contents = saved.contents
            for first, end in _runs(bitmap):
                start, stop = first * PAGE_SIZE, end * PAGE_SIZE
                view[start:stop] = contents[start:stop]
                pages += end - first
        self._restore_vcpus()
        return pages

    def _restore_vcpus(self) -> None:
        for prepared in self._vcpus:
            prepared.vcpu.restore_state(prepared)

    def restore_all(self) -> None:
        """Copy back the whole of guest RAM (and the registers), whatever the
        dirty log says: the full restore a dirty-page reset is measured against."""
        vm = self.vm
        settle(vm)
        self._vmm_dirty = {}
        for saved in self._regions:
            vm.dirty_log(saved.region)
            saved.region.view()[:] = saved.contents
        self._restore_vcpus()


def _runs(bitmap: bytes) -> list[tuple[int, int]]:
    """``(first, end)`` page ranges of consecutive set bits (bit *i* of byte
    *j* is page ``8*j + i``).

    The bitmap is read in chunks of :data:`_CHUNK` bytes, each as one integer:
    a clean chunk is skipped with one comparison, and in a dirty one each run
    is found with two bit tricks (lowest set bit, then the count of trailing
    ones) on a small integer.  So the cost follows the number of runs, not the
    size of guest RAM, and stays linear however scattered the pages are.
    """
    runs: list[tuple[int, int]] = []
    clean = bytes(_CHUNK)
    for offset in range(0, len(bitmap), _CHUNK):
        chunk = bitmap[offset : offset + _CHUNK]
        if chunk == clean[: len(chunk)]:
            continue
        value = int.from_bytes(chunk, "little")
        base = offset * 8
        while value:
            zeros = (value & -value).bit_length() - 1
            value >>= zeros
            ones = (value ^ (value + 1)).bit_length() - 1
            first = base + zeros
            if runs and runs[-1][1] == first:  # a run that crosses a chunk boundary
                runs[-1] = (runs[-1][0], first + ones)
            else:
                runs.append((first, first + ones))
            value >>= ones
            base = first + ones
    return runs


#: Bytes of dirty bitmap read as one integer (2048 pages, 8 MiB of guest RAM).
_CHUNK = 256
