"""Machine snapshots: stop a running machine at a point, save it -- RAM, every
vCPU, the hypervisor's irqchip, PIT and clock, and every device of the board --
and build a machine that continues from it.

When to save (``pyvmm run --snapshot-to FILE``):

* the guest asks: a write of any value to port :data:`SNAPSHOT_PORT` (0x5f0)
  on the PC, to the page at 0x0a00_2000 on the aarch64 ``virt`` board -- the
  point a test guest or a fuzzing harness chooses.  Without ``--snapshot-to``
  the register ignores writes, so the same guest also runs unstopped;
* after a time: ``--snapshot-after SECONDS`` of running.

The machine then stops (``StopReason.SNAPSHOT``, status 0) and writes the file;
``pyvmm run --restore FILE`` with the same machine options (memory, vCPUs,
irqchip, kernel) builds the machine, replaces its RAM, vCPU and device state
with the file's, and runs on from where it stopped.  A file of another machine
-- other RAM layout, vCPU count, devices or device state versions -- is a
:class:`~pyvmm.snapshot.SnapshotError` naming the difference, and the machine
being built is closed.

Each vCPU's state is read and written on that vCPU's own thread
(:attr:`Runner.vcpu_stopped`, :attr:`Runner.vcpu_ready`), after
:func:`~pyvmm.snapshot.settle_vcpu` finished its last exit.  Devices are found
on the machine's buses and keyed by where they sit, so the restore finds each
one again (the 8259 pair and 8254 of ``--irqchip userspace`` too): every device
must declare its state (:mod:`pyvmm.devices.state`); one that cannot be
snapshotted (pc-testdev) makes the save refuse by name.  The devices are read
once every vCPU has stopped, by the first vCPU thread past that point, not after
the run has wound down: their clocks (the 8254's) go on meanwhile.

With the board's own interrupt controllers (``--irqchip userspace``) a vCPU
stopped while it waited in ``hlt`` has no MP state to say so (that is the
hypervisor's local APIC's), and its RIP is already past the ``hlt``.  The
snapshot therefore holds one more record beside the devices' (:data:`HLT_WAIT_KEY`):
which vCPUs the runner held in its ``hlt`` wait, as QEMU saves ``halted`` with
every CPU (``vmstate_cpu_common``).  The restore starts those vCPUs in that same
wait, where the board's controllers wake them exactly as they would have: the
first interrupt raised after the restore, whenever it comes, is the one the
vCPU takes.  A file without the record (written before it existed) holds those
vCPUs with RIP moved back onto the ``hlt``: they run and execute it again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from pyvmm.capabilities import Capability
from pyvmm.devices.state import DeviceImage, DeviceStateError, Stateful, check_version
from pyvmm.errors import ConfigError
from pyvmm.machine.bus import MmioBus, PortBus
from pyvmm.machine.outcome import STATUS_CLEAN, StopReason
from pyvmm.machine.runner import Runner
from pyvmm.machine.snapshot_port import SNAPSHOT_PORT, SnapshotRequestPort
from pyvmm.snapshot import (
    Snapshot,
    SnapshotError,
    VcpuImage,
    apply_vcpu,
    apply_vm,
    capture_vcpu,
    capture_vm,
    fill_ram,
    load,
    settle_vcpu,
    write,
)
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Vcpu, Vm
from pyvmm.vm_state import X86_IRQCHIP_KINDS

#: How long a stopped vCPU waits for the others before the snapshot is given up.
STOP_WAIT_SECONDS = 10.0


def bus_devices(pio: PortBus, mmio: MmioBus) -> dict[str, Stateful]:
    """Every device whose state a snapshot holds, keyed by its bus, address and
    name (port views of one controller count once, at their first address)."""
    found: dict[str, Stateful] = {}
    seen: set[int] = set()
    for space, bus in (("pio", pio), ("mmio", mmio)):
        for base, _, device in bus.ranges:
            holder = device.state_holder()
            if id(holder) in seen:
                continue
            seen.add(id(holder))
            found[f"{space}@{base:#x}:{holder.name}"] = holder
    return found


#: The key of the runner's record among a snapshot's device images: which vCPUs
#: waited in ``hlt`` for the board's own interrupt controllers.  No bus device's
#: key starts so (theirs start with their bus).
HLT_WAIT_KEY = "runner:hlt-wait"
#: The record's version.  Version 1: field ``vcpus``, one byte per vCPU in vCPU
#: order, 1 for a vCPU held in the wait, 0 for one that was not.
HLT_WAIT_VERSION = 1
_WAITING, _RUNNING = 1, 0
#: RFLAGS.IF, interrupts enabled (Intel SDM vol. 1, 3.4.3.3).
_RFLAGS_IF = 1 << 9


def hlt_wait_image(waiting: Iterable[int], count: int) -> DeviceImage:
    """The record of the ``count`` vCPUs, those in ``waiting`` held in the runner's ``hlt`` wait."""
    held = set(waiting)
    flags = bytes(_WAITING if index in held else _RUNNING for index in range(count))
    return DeviceImage(HLT_WAIT_KEY, HLT_WAIT_VERSION, {"vcpus": flags})


def vcpus_in_hlt_wait(image: Snapshot) -> frozenset[int]:
    """The vCPUs ``image`` says the runner held in its ``hlt`` wait, checked
    against the rest of the snapshot (call it before building anything).
    Empty for a snapshot without the record: saved on the VM API, or by a pyvmm
    that moved their RIP back onto the ``hlt`` instead.

    :raises SnapshotError: the record is of another version, or its values are
        damaged or contradict the vCPUs' saved state (named).
    """
    records = [device for device in image.devices or () if device.key == HLT_WAIT_KEY]
    if not records:
        return frozenset()
    (record,) = records  # keys are unique (checked when the file was read)
    where = f"the snapshot's record {HLT_WAIT_KEY}"
    if record.version != HLT_WAIT_VERSION:
        raise SnapshotError(f"{where}: version {record.version}, this pyvmm reads version {HLT_WAIT_VERSION}")
    flags = record.state.get("vcpus")
    if set(record.state) != {"vcpus"} or not isinstance(flags, bytes):
        raise SnapshotError(f"{where}: expected one field, vcpus, as bytes; found {sorted(record.state)}")
    if len(flags) != len(image.vcpus) or not set(flags) <= {_WAITING, _RUNNING}:
        raise SnapshotError(
            f"{where}: expected one byte, 0 or 1, for each of the {len(image.vcpus)} vCPU(s); found {flags.hex()}"
        )
    waiting = frozenset(index for index, flag in enumerate(flags) if flag == _WAITING)
    if waiting and image.vm_states:
        raise SnapshotError(
            f"{where}: vCPU(s) {sorted(waiting)} waiting for pyvmm's own interrupt controllers in a snapshot "
            "of the hypervisor's (their MP state says whether they are halted)"
        )
    for index in sorted(waiting):
        # What the wait itself requires of a vCPU: interrupts on (a hlt with
        # them off never waits) and nothing being injected (one is delivered
        # only once the wait is over).
        regs = dict(image.vcpus[index]).get(StateKind.REGS)
        events = image.events[index]
        if regs is None or not regs.rflags & _RFLAGS_IF:
            raise SnapshotError(f"{where}: vCPU {index} is waiting for an interrupt with interrupts disabled")
        if events is not None and events.interrupt.injected:
            raise SnapshotError(f"{where}: vCPU {index} is waiting for an interrupt while one is being injected")
    return waiting


def check_vm_state_sizes(vm: Vm, image: Snapshot) -> None:
    """Refuse, while the machine is built, VM-wide images of another size than
    this hypervisor's (they are set only once the vCPUs exist).  The x86
    chips' only: an aarch64 GIC image was checked against the vCPUs when the
    file was loaded, and a hypervisor's GIC may be readable only once the VM
    started (the backend compares the rest when the image is set).

    :raises SnapshotError: an image's size differs (named).
    """
    for kind, data in image.vm_states:
        if kind not in X86_IRQCHIP_KINDS:
            continue
        size = len(vm.get_vm_state(kind))
        if len(data) != size:
            raise SnapshotError(
                f"the snapshot's VM state {kind.value} does not fit this VM: {len(data)} bytes, this hypervisor's "
                f"are {size} (saved by another kernel?)"
            )


def save_devices(devices: dict[str, Stateful]) -> list[DeviceImage]:
    """Each device's state.

    :raises SnapshotError: a device cannot be snapshotted (named).
    """
    unsupported = [key for key, device in devices.items() if device.state_version is None]
    if unsupported:
        raise SnapshotError(f"these devices cannot be snapshotted: {', '.join(unsupported)}")
    return [DeviceImage(key, device.state_version or 0, device.save_state()) for key, device in devices.items()]


def load_devices(devices: dict[str, Stateful], images: list[DeviceImage]) -> None:
    """Give each device its saved state.

    :raises SnapshotError: the devices differ from the snapshot's, or a state
        does not fit its device (the machine is then closed by its builder).
    """
    saved = {image.key: image for image in images}
    if set(saved) != set(devices):
        missing, extra = sorted(set(saved) - set(devices)), sorted(set(devices) - set(saved))
        raise SnapshotError(
            f"the snapshot's devices are not this machine's: only in the snapshot {missing}, only here {extra} "
            "(restore with the options the snapshot was saved with: memory, vCPUs, irqchip, kernel)"
        )
    try:
        for key, device in devices.items():
            check_version(key, saved[key].version, device.state_version)
        for key, device in devices.items():
            device.load_state(saved[key].state)
    except DeviceStateError as exc:
        raise SnapshotError(str(exc)) from exc


class MachineSnapshots:
    """The snapshot side of one machine: saving at a point, or starting from one.

    :param restore: a snapshot (or its path) to start from.
    :param save_to: where to save when the guest asks or ``save_after`` passes.
    :param register_request: puts the request register on the board's bus (by
        default port 0x5f0, the PC's).
    """

    def __init__(
        self,
        vm: Vm,
        runner: Runner,
        pio: PortBus,
        mmio: MmioBus,
        *,
        save_to: str | os.PathLike[str] | None = None,
        save_after: float | None = None,
        register_request: Callable[[SnapshotRequestPort], None] | None = None,
    ) -> None:
        if save_after is not None and save_to is None:
            raise ConfigError("snapshot_after: a time to save a snapshot needs a file to save it to")
        if save_after is not None and save_after <= 0:
            raise ConfigError(f"snapshot_after: must be above 0 seconds, not {save_after:g}")
        self.vm = vm
        self.runner = runner
        self.pio = pio
        self.mmio = mmio
        self.save_to = None if save_to is None else Path(save_to)
        self.request_port = SnapshotRequestPort()
        if register_request is None:
            pio.register(SNAPSHOT_PORT, 1, self.request_port)
        else:
            register_request(self.request_port)
        self._images: dict[int, VcpuImage] = {}
        #: The devices' images, read as the vCPUs stopped (or why they could not be).
        self._devices: list[DeviceImage] | SnapshotError | None = None
        self._lock = threading.Lock()
        #: Every vCPU thread waits here, settled, before any reads its state.
        self._all_stopped: threading.Barrier | None = None
        if self.save_to is not None:
            if not self.save_to.parent.is_dir():
                raise ConfigError(f"snapshot_to: {self.save_to.parent} is not a directory")
            if self.save_to.is_dir():
                # Found now, not after the guest ran to its snapshot point.
                raise ConfigError(f"snapshot_to: {self.save_to} is a directory, not a file to write")
            self.request_port.on_request = self._requested
            runner.snapshot_after = save_after
            runner.vcpu_stopped = self._vcpu_stopped

    # --- saving -------------------------------------------------------------------
    def _requested(self) -> None:
        self.runner.request_stop(StopReason.SNAPSHOT, STATUS_CLEAN, f"the guest asked for a snapshot ({self.save_to})")

    def _vcpu_stopped(self, vcpu: Vcpu) -> None:
        """On each vCPU's thread as its loop ends.  The state is read only once
        every vCPU stopped: a vCPU still running could otherwise change another's
        after it was read (an IPI landing in a local APIC already saved)."""
        if self.runner.stop_reason is not StopReason.SNAPSHOT:
            return
        settle_vcpu(vcpu)
        with self._lock:
            if self._all_stopped is None:
                self._all_stopped = threading.Barrier(len(self.vm.vcpus))
            barrier = self._all_stopped
        try:
            arrival = barrier.wait(STOP_WAIT_SECONDS)
        except threading.BrokenBarrierError:
            return  # a vCPU never got here: save() names the vCPUs without an image
        if arrival == 0:
            # The devices now, with the vCPUs, not once the run has ended: their
            # clocks go on meanwhile (the 8254's next tick, saved late, came
            # due at once and bunched with the one after it on the slow amd64
            # test bed, and the guest counted two).
            try:
                devices: list[DeviceImage] | SnapshotError = save_devices(bus_devices(self.pio, self.mmio))
            except SnapshotError as exc:
                devices = exc  # save() raises it, and writes nothing
            with self._lock:
                self._devices = devices
        image = capture_vcpu(vcpu)
        with self._lock:
            self._images[vcpu.index] = image

    def save(self) -> Snapshot:
        """Write the snapshot of the machine, stopped for it, to ``save_to``.

        :raises SnapshotError: a vCPU's state was not read (it never ran), or a
            device cannot be snapshotted; nothing is written then.
        """
        assert self.save_to is not None
        count = len(self.vm.vcpus)
        missing = [i for i in range(count) if i not in self._images]
        if missing:
            raise SnapshotError(
                f"vCPU(s) {missing} did not stop for the snapshot (never ran, or did not leave the guest in "
                f"{STOP_WAIT_SECONDS:g} s): the machine cannot be saved"
            )
        if isinstance(self._devices, SnapshotError):
            raise self._devices
        assert self._devices is not None  # read by the first vCPU past the barrier
        # Whether an interrupt was already waking one of them needs no deciding
        # here: the restored wait asks the restored controllers, as the live one did.
        devices = [*self._devices, hlt_wait_image(self.runner.stopped_in_hlt, count)]
        images = [self._images[i] for i in range(count)]
        image = capture_vm(self.vm, images, devices)
        write(image, self.save_to)
        return image

    # --- restoring -----------------------------------------------------------------
    def restore(self, snapshot: Snapshot | str | os.PathLike[str], cpus: int) -> None:
        """Put ``snapshot`` into the machine just built (RAM, VM-wide state and
        devices now; each vCPU's state on its thread before it runs).

        :raises SnapshotError: the file is damaged or of another machine.
        """
        image = snapshot if isinstance(snapshot, Snapshot) else load(snapshot)
        if image.devices is None:
            raise SnapshotError(
                "this snapshot was saved on the VM API (it holds no device state): restore it with "
                "pyvmm.snapshot.restore, not into a machine"
            )
        if image.arch is not self.vm.config.arch:
            raise SnapshotError(
                f"the snapshot is of an {image.arch.value} guest, this machine runs {self.vm.config.arch.value}"
            )
        if len(image.vcpus) != cpus:
            raise SnapshotError(f"the snapshot has {len(image.vcpus)} vCPU(s), this machine {cpus}")
        if bool(image.vm_states) != self.vm.has_irqchip:
            has = "has" if image.vm_states else "has no"
            raise SnapshotError(f"the snapshot {has} in-kernel irqchip state; this machine's irqchip setting differs")
        check_vm_state_sizes(self.vm, image)
        waiting = vcpus_in_hlt_wait(image)
        if waiting and not self.vm.backend.supports(Capability.IMMEDIATE_EXIT):
            # (Runner.start_in_hlt_wait: the wait needs the backend's word on
            # whether the vCPU takes interrupts, which only a run gives.)
            raise SnapshotError(
                f"vCPU(s) {sorted(waiting)} were saved waiting in hlt; backend {self.vm.backend.name!r} cannot "
                "say whether a restored vCPU takes interrupts without running it (it has no IMMEDIATE_EXIT)"
            )
        devices = [device for device in image.devices if device.key != HLT_WAIT_KEY]
        load_devices(bus_devices(self.pio, self.mmio), devices)
        fill_ram(self.vm, image)

        def ready(vcpu: Vcpu) -> None:
            apply_vcpu(vcpu, image.vcpu_image(vcpu.index))

        def all_ready() -> None:
            # After every vCPU has its state, as QEMU and crosvm restore the
            # irqchip: the hypervisor delivers a level line the IOAPIC image
            # holds pending as the image is set, and with no vCPU to take it
            # marks it in service (remote IRR) for an EOI that never comes
            # (the backend notes, restore order).  The clock is set here too, as
            # the guest is about to run, not while the machine is being built.
            apply_vm(self.vm, image)
            # The devices again, for the same reason: they were loaded (and checked)
            # while the machine was built, and the time since counted on the
            # 8254's clock; a slow build (the amd64 test bed) had its next tick
            # fire before the guest ran, early.  Loading is idempotent.  The
            # timers are held meanwhile: a tick of the 8254 as built, landing in
            # the 8259s already loaded again, would come early too.
            with self.runner.timers_held():
                load_devices(bus_devices(self.pio, self.mmio), devices)

        self.runner.vcpu_ready = ready
        self.runner.vcpus_ready = all_ready
        # In the wait from the start, as after their hlt exit: an interrupt the
        # restored controllers hold, or the first one raised later (before or
        # after the vCPU got there, the wait looks at the controller itself), is
        # delivered at its next entry; it never runs guest code unwoken.
        self.runner.start_in_hlt_wait = waiting
