"""A driver *model* of ``/dev/gzvm``: a stand-in for MediaTek GenieZone, not a backend.

pyvmm-geniezone's tests run on it, and so can a VMM developer without a
MediaTek SoC: ``with GenieZoneModel().installed(): ...`` routes
``pyvmm_geniezone.host.HOST`` to the model, which answers every call as the
Android Common Kernel's GenieZone driver does, with the hypervisor folded in:

* the **driver** (``drivers/virt/geniezone/gzvm_main.c``, ``gzvm_vm.c``,
  ``gzvm_vcpu.c``, ``gzvm_irqfd.c``, ``gzvm_ioeventfd.c``,
  ``gzvm_exception.c``; ``arch/arm64/geniezone/vm.c``, ``vgic.c``, ``hvc.c``):
  argument checks and errnos, the memory-slot rules (slot count, alignment to
  the host's page, the one VMA of exactly the slot's size, looked up in this
  process's ``/proc/self/maps`` as ``vma_lookup`` finds it, and every page
  pinned for writing), the run ioctl's copy in /
  copy out of the VMM's ``gzvm_vcpu_run``, ``immediate_exit`` at entry only,
  a pending signal turning any result into ``-ERESTARTSYS`` *after* the copy
  out, the in-kernel exits (ioeventfd writes, MEM_RELINQUISH, IRQ, GZ, IDLE),
  irqfds that only ever raise their SPI (also for a count found at assign),
  every injection waking the idle vCPUs, and what it does at close;
* the **hypervisor**: the guest runs on pyvmm's software CPU (fully populated
  memory), starting from the registers ``GZVM_SET_ONE_REG`` set; vCPU 0 is on
  and the others wait for PSCI ``CPU_ON``; PSCI ``SYSTEM_OFF``/``SYSTEM_RESET``
  end the run with a ``SYSTEM_EVENT`` exit; any other HVC goes to the VMM as a
  ``HYPERCALL`` exit whose ``args[0..3]`` come back in X0..X3; every exit
  reason is written into the run struct; the vGICv3
  (:mod:`pyvmm.softcpu.gic`) sits where ``GZVM_CREATE_DEVICE`` put it, its MMIO
  emulated without an exit, its SPIs raised by ``GZVM_IRQ_LINE`` and irqfds,
  the virtual timer its PPI; a vCPU in WFI sleeps in the driver until an
  interrupt for it or a signal.

Every constraint is a module-level :class:`~pyvmm.testing.driver_model.Rule`
citing ``docs/backends/geniezone.md`` (``§N``) and the driver function it comes
from.  The model reads the plugin's structs with its own ``struct`` formats and
imports nothing of the plugin but its host switch.  Where the answer is the
hypervisor's and the driver does not show it, the model raises
:class:`~pyvmm.testing.driver_model.ModelGap`: a VM type other than 0, a memory
slot registered twice or overlapping another, memory after the guest ran, a
duplicate vCPU id, device attributes, a protected VM's run, demand paging
or idle support asked for by the VMM, lowering an SPI still pending (edge or
level), registers other than the core ones, the PTP hypercall and what the
hypervisor makes of a guest's MEM_RELINQUISH, PSCI calls other than VERSION,
CPU_ON/OFF, AFFINITY_INFO, SYSTEM_OFF and SYSTEM_RESET, a guest exception,
running a vCPU again after its VM shut down.

Branches marked ``# behaviour:`` are flipped one at a time by
``tools/mutate_model.py``, which also removes each rule's ``raise``; the tests
must catch every such mutant.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pyvmm.arch.aarch64 import PC_ID, PSTATE_EL1H_DAIF, PSTATE_ID, REG_ARM64, REG_ARM_CORE, x_reg_id
from pyvmm.boot import Aarch64VcpuInit
from pyvmm.errors import ConfigError
from pyvmm.exits import ExitKind, HltExit, InternalErrorExit, MmioExit, VcpuExit
from pyvmm.softcpu import Hypercall
from pyvmm.softcpu.gic import GICD_SIZE, GICR_STRIDE, Gic
from pyvmm.testing.driver_model import (
    ERESTARTSYS,
    NO_SUCH_IOCTL,
    DeviceFileModel,
    FileObject,
    GuestCpu,
    Rule,
    RuleViolation,
    handles,
)

__all__ = ["GenieZoneModel"]

#: The checkpoint the run loop passes each time the hypervisor returns an exit
#: (for :meth:`GenieZoneModel.signal_at`: a signal arriving just then).
HYPERVISOR_RETURNED = "gzvm:hypervisor returned"

#: How often a sleeping vCPU looks at the irqfds' eventfds (seconds).
IRQFD_POLL = 0.002

_U64 = (1 << 64) - 1

# --- the interface, from docs/backends/geniezone.md §2-§3 --------------------------
# Numbers are written out rather than imported from the plugin's bindings, so a
# wrong binding cannot make the model agree with it.
GZVM_CREATE_VM = 0x00009201
GZVM_CHECK_EXTENSION = 0x00009203
GZVM_CREATE_VCPU = 0x00009241
GZVM_SET_USER_MEMORY_REGION = 0x40209246
GZVM_IRQ_LINE = 0x40089261
GZVM_IRQFD = 0x40209276
GZVM_IOEVENTFD = 0x40409279
GZVM_ENABLE_CAP = 0x403092A3
GZVM_CREATE_DEVICE = 0xC03092E0
GZVM_SET_DTB_CONFIG = 0x401092FF
GZVM_RUN = 0x00009280
GZVM_GET_ONE_REG = 0x401092AB
GZVM_SET_ONE_REG = 0x401092AC

MEM_REGION = struct.Struct("<IIQQQ")  # slot, flags, guest_phys_addr, memory_size, userspace_addr (32)
IRQ_LEVEL = struct.Struct("<II")  # irq, level (8)
CREATE_DEVICE = struct.Struct("<IIQQQQQ")  # dev_type, id, flags, dev_addr, dev_reg_size, attr_addr, attr_size (48)
ENABLE_CAP = struct.Struct("<6Q")  # cap, args[5] (48)
ONE_REG = struct.Struct("<QQ")  # id, addr (16)
IRQFD = struct.Struct("<IIII16s")  # fd, gsi, flags, resamplefd, pad (32)
IOEVENTFD = struct.Struct("<QQIiI36s")  # datamatch, addr, len, fd, flags, pad (64)
DTB_CONFIG = struct.Struct("<QQ")  # dtb_addr, dtb_size (16)
U64 = struct.Struct("<Q")

# gzvm_vcpu_run (264 bytes): exit_reason u32 @0, immediate_exit u8 @4, padding1[3] @5,
# union @8 (256 bytes).
RUN_SIZE = 264
RUN_EXIT_REASON = 0
RUN_IMMEDIATE_EXIT = 4
RUN_PADDING1 = slice(5, 8)
RUN_UNION = 8
MMIO_LAYOUT = struct.Struct("<Q8sQIB")  # phys_addr @8, data @16, size @24, reg_nr @32, is_write @36
RUN_MMIO_DATA = 16
HYPERCALL_ARGS = struct.Struct("<8Q")  # args @8
SYSTEM_EVENT_LAYOUT = struct.Struct("<II")  # type @8, ndata @12

EXIT_MMIO = 0x92920001
EXIT_HYPERCALL = 0x92920002
EXIT_IRQ = 0x92920003
EXIT_SYSTEM_EVENT = 0x92920008
EXIT_GZ = 0x9292000A
EXIT_IDLE = 0x9292000B
SYSTEM_EVENT_SHUTDOWN, SYSTEM_EVENT_RESET = 1, 2
HVC_PTP = 0x86000001
HVC_MEM_RELINQUISH = 0xC6000009

CAP_VM_GPA_SIZE = 0xA5
CAP_PROTECTED_VM = 0xFFBADAB1
CAP_BLOCK_BASED_DEMAND_PAGING = 0x9201
CAP_ENABLE_DEMAND_PAGING = 0x9202
CAP_ENABLE_IDLE = 0x9203
PVM_SET_PVMFW_GPA, PVM_GET_PVMFW_SIZE, PVM_SET_PROTECTED_VM = 0, 1, 2

#: The kernel's PAGE_SIZE, which the driver's alignment and page counts use: the
#: host's (arm64 kernels run 4, 16 or 64 KiB pages).
HOST_PAGE = mmap.PAGESIZE
MAX_VCPUS = 8  # GZVM_MAX_VCPUS
MAX_MEM_REGION = 10  # GZVM_MAX_MEM_REGION
MEM_MAX_NR_PAGES = (1 << 31) - 1  # GZVM_MEM_MAX_NR_PAGES
#: The purpose of guest RAM (crosvm GZVM_USER_MEM_REGION_GUEST_MEM); 2 and 4 are
#: a protected VM's firmware and swiotlb, which only a protected VM uses.
MEM_GUEST = 1
DEV_VGIC_V3_DIST, DEV_VGIC_V3_REDIST = 0, 1
IRQFD_DEASSIGN, IRQFD_RESAMPLE = 1, 2
IOEVENTFD_DATAMATCH, IOEVENTFD_PIO, IOEVENTFD_DEASSIGN = 1, 2, 4
IOEVENTFD_VALID_FLAGS = 7
REG_SIZE_SHIFT, REG_SIZE_MASK = 52, 0x00F0000000000000
#: The SPIs the hypervisor's vGIC is modelled with: crosvm routes 32
#: (``devices/src/irqchip/geniezone/mod.rs`` ``AARCH64_GIC_NR_SPIS``).
VGIC_SPIS = 32

_S = "docs/backends/geniezone.md"

# --- rules ----------------------------------------------------------------------------
R_CHECK_EXTENSION_NULL = Rule(
    "GZ-CHECK-EXTENSION-NULL",
    errno.EINVAL,
    "GZVM_CHECK_EXTENSION on /dev/gzvm takes a pointer to the capability, not 0",
    f"{_S} §3; gzvm_main.c gzvm_dev_ioctl",
)
R_MEM_SLOT = Rule(
    "GZ-MEM-SLOT",
    errno.EINVAL,
    "memory slot numbers are 0..9 (GZVM_MAX_MEM_REGION)",
    f"{_S} §4.2; gzvm_vm.c memory_region_pre_check",
)
R_MEM_ALIGN = Rule(
    "GZ-MEM-ALIGN",
    errno.EINVAL,
    "a slot's guest address and size must be page-aligned",
    f"{_S} §4.2; gzvm_vm.c memory_region_pre_check",
)
R_MEM_WRAP = Rule(
    "GZ-MEM-WRAP",
    errno.EINVAL,
    "a slot must not run past 2^64 (guest_phys_addr + memory_size wraps)",
    f"{_S} §4.2; gzvm_vm.c memory_region_pre_check",
)
R_MEM_PAGES = Rule(
    "GZ-MEM-PAGES",
    errno.EINVAL,
    "a slot has at most 2^31-1 pages (GZVM_MEM_MAX_NR_PAGES)",
    f"{_S} §4.2; gzvm_vm.c memory_region_pre_check",
)
R_MEM_NO_VMA = Rule(
    "GZ-MEM-NO-VMA",
    errno.EFAULT,
    "the slot's userspace_addr lies in no mapping of the process",
    f"{_S} §4.2; gzvm_vm.c gzvm_vm_ioctl_set_memory_region (vma_lookup)",
)
R_MEM_VMA_SIZE = Rule(
    "GZ-MEM-VMA-SIZE",
    errno.EINVAL,
    "the mapping holding userspace_addr must be exactly memory_size long",
    f"{_S} §4.2; gzvm_vm.c gzvm_vm_ioctl_set_memory_region (vm_end - vm_start != memory_size)",
)
R_MEM_PIN = Rule(
    "GZ-MEM-PIN",
    errno.EFAULT,
    "a fully populated slot's pages, userspace_addr onwards, are pinned for writing: all must be mapped writable",
    f"{_S} §4.2; arch/arm64/geniezone/vm.c gzvm_vm_populate_mem_region, gzvm_mmu.c pin_one_page (FOLL_WRITE)",
)
R_VCPU_ID = Rule(
    "GZ-VCPU-ID",
    errno.EINVAL,
    "vCPU ids are 0..7 (GZVM_MAX_VCPUS)",
    f"{_S} §5; gzvm_vcpu.c gzvm_vm_ioctl_create_vcpu",
)
R_DEVICE_ATTR_SIZE = Rule(
    "GZ-DEVICE-ATTR-SIZE",
    errno.EINVAL,
    "device attributes are at most one page",
    f"{_S} §7.1; gzvm_vm.c gzvm_vm_ioctl_create_device",
)
R_ENABLE_CAP = Rule(
    "GZ-ENABLE-CAP",
    errno.EINVAL,
    "GZVM_ENABLE_CAP knows PROTECTED_VM, ENABLE_DEMAND_PAGING, BLOCK_BASED_DEMAND_PAGING and ENABLE_IDLE only",
    f"{_S} §5.2; arch/arm64/geniezone/vm.c gzvm_vm_ioctl_arch_enable_cap",
)
R_PVM_SUBCOMMAND = Rule(
    "GZ-PVM-SUBCOMMAND",
    errno.EINVAL,
    "ENABLE_CAP(PROTECTED_VM) args[0] is SET_PVMFW_GPA (0), GET_PVMFW_SIZE (1) or SET_PROTECTED_VM (2)",
    f"{_S} §5.2; arch/arm64/geniezone/vm.c gzvm_vm_ioctl_cap_pvm",
)
R_IRQFD_PAD = Rule(
    "GZ-IRQFD-PAD",
    errno.EINVAL,
    "gzvm_irqfd.pad must be zero",
    f"{_S} §7.3; gzvm_irqfd.c gzvm_irqfd",
)
R_IRQFD_FLAGS = Rule(
    "GZ-IRQFD-FLAGS",
    errno.EINVAL,
    "irqfd flags other than DEASSIGN (1) and RESAMPLE (2)",
    f"{_S} §7.3; gzvm_irqfd.c gzvm_irqfd",
)
R_EVENTFD_BADF = Rule(
    "GZ-EVENTFD-BADF",
    errno.EBADF,
    "the fd of an irqfd or ioeventfd is not open",
    f"{_S} §7.3, §7.4; gzvm_irqfd.c gzvm_irqfd_assign (fdget), gzvm_ioeventfd.c (eventfd_ctx_fdget)",
)
R_NOT_EVENTFD = Rule(
    "GZ-NOT-EVENTFD",
    errno.EINVAL,
    "the fd of an irqfd or ioeventfd must be an eventfd",
    f"{_S} §7.3, §7.4; gzvm_irqfd.c gzvm_irqfd_assign (eventfd_ctx_fileget), gzvm_ioeventfd.c",
)
R_RESAMPLEFD_BADF = Rule(
    "GZ-RESAMPLEFD-BADF",
    errno.EBADF,
    "an irqfd with RESAMPLE names a resamplefd that is not open",
    f"{_S} §7.3; gzvm_irqfd.c gzvm_irqfd_assign (eventfd_ctx_fdget(args->resamplefd))",
)
R_RESAMPLEFD_NOT_EVENTFD = Rule(
    "GZ-RESAMPLEFD-NOT-EVENTFD",
    errno.EINVAL,
    "an irqfd with RESAMPLE needs an eventfd as its resamplefd",
    f"{_S} §7.3; gzvm_irqfd.c gzvm_irqfd_assign (eventfd_ctx_fdget(args->resamplefd))",
)
R_IRQFD_BUSY = Rule(
    "GZ-IRQFD-BUSY",
    errno.EBUSY,
    "the eventfd already drives an irqfd of this VM",
    f"{_S} §7.3; gzvm_irqfd.c gzvm_irqfd_assign",
)
R_IOEVENTFD_LEN = Rule(
    "GZ-IOEVENTFD-LEN",
    errno.EINVAL,
    "ioeventfd len must be 0, 1, 2, 4 or 8",
    f"{_S} §7.4; gzvm_ioeventfd.c gzvm_ioeventfd_check_valid",
)
R_IOEVENTFD_WRAP = Rule(
    "GZ-IOEVENTFD-WRAP",
    errno.EINVAL,
    "an ioeventfd's addr + len must not wrap",
    f"{_S} §7.4; gzvm_ioeventfd.c gzvm_ioeventfd_check_valid",
)
R_IOEVENTFD_FLAGS = Rule(
    "GZ-IOEVENTFD-FLAGS",
    errno.EINVAL,
    "ioeventfd flags other than DATAMATCH (1), PIO (2), DEASSIGN (4)",
    f"{_S} §7.4; gzvm_ioeventfd.c gzvm_ioeventfd_check_valid",
)
R_IOEVENTFD_DATAMATCH_LEN = Rule(
    "GZ-IOEVENTFD-DATAMATCH-LEN",
    errno.EINVAL,
    "an ioeventfd without a length cannot DATAMATCH",
    f"{_S} §7.4; gzvm_ioeventfd.c gzvm_ioeventfd_check_valid",
)
R_IOEVENTFD_PIO = Rule(
    "GZ-IOEVENTFD-PIO",
    errno.EINVAL,
    "GenieZone has no port-I/O ioeventfds",
    f"{_S} §7.4; gzvm_ioeventfd.c gzvm_ioeventfd_check_valid",
)
R_IOEVENTFD_COLLISION = Rule(
    "GZ-IOEVENTFD-COLLISION",
    errno.EEXIST,
    "an ioeventfd already covers this address (same address and length/data, or inside its range)",
    f"{_S} §7.4; gzvm_ioeventfd.c ioeventfd_check_collision",
)
R_IOEVENTFD_NOENT = Rule(
    "GZ-IOEVENTFD-NOENT",
    errno.ENOENT,
    "DEASSIGN matched no ioeventfd (eventfd, address, length and datamatch must all match)",
    f"{_S} §7.4; gzvm_ioeventfd.c gzvm_deassign_ioeventfd",
)
R_RUN_PADDING = Rule(
    "GZ-RUN-PADDING",
    errno.EINVAL,
    "gzvm_vcpu_run.padding1 must be zero",
    f"{_S} §6.1; gzvm_vcpu.c gzvm_vcpu_run",
)
R_GET_ONE_REG = Rule(
    "GZ-GET-ONE-REG",
    errno.EOPNOTSUPP,
    "registers cannot be read: GZVM_GET_ONE_REG always fails",
    f"{_S} §6.4; gzvm_vcpu.c gzvm_vcpu_ioctl",
)
R_ONE_REG_SIZE = Rule(
    "GZ-ONE-REG-SIZE",
    errno.EINVAL,
    "a register id's size field must say 1, 2, 4 or 8 bytes",
    f"{_S} §6.4; gzvm_vcpu.c gzvm_vcpu_update_one_reg",
)
R_VM_CLOSED_FIRST = Rule(
    "GZ-VM-CLOSED-FIRST",
    0,
    "the VM fd closed while vCPU fds are open: the driver frees those vCPUs under them",
    f"{_S} §5.3; gzvm_vm.c gzvm_destroy_vm (gzvm_destroy_vcpus; a vCPU fd holds no VM reference)",
)

# PSCI function ids (Arm DEN0022) the hypervisor answers.
PSCI_VERSION = 0x84000000
PSCI_CPU_OFF = 0x84000002
PSCI_CPU_ON = (0x84000003, 0xC4000003)
PSCI_AFFINITY_INFO = (0x84000004, 0xC4000004)
PSCI_SYSTEM_OFF = 0x84000008
PSCI_SYSTEM_RESET = 0x84000009
#: PSCI 0.2, what crosvm says a GenieZone vCPU speaks (``GeniezoneVcpu::get_psci_version``).
PSCI_VERSION_0_2 = 0x00000002
PSCI_SUCCESS, PSCI_INVALID_PARAMETERS, PSCI_ALREADY_ON = 0, -2, -4
AFFINITY_ON, AFFINITY_OFF = 0, 1


def _is_psci(function: int) -> bool:
    return (function & 0xBFFFFFE0) == 0x84000000


# --- the model --------------------------------------------------------------------------


@dataclass
class ModelStats:
    """What the model saw, for tests to assert on."""

    psci_calls: list[int] = field(default_factory=list)
    ioevents_signalled: int = 0
    spis_raised: int = 0
    idle_sleeps: int = 0
    hypervisor_entries: int = 0


class GenieZoneModel(DeviceFileModel):
    """The model of one host's ``/dev/gzvm``.

    :param gpa_bits: what ``GZVM_CAP_VM_GPA_SIZE`` answers (the host kernel's
        ``CONFIG_ARM64_PA_BITS``).
    :param pvmfw_size: the size the hypervisor reports for its protected-VM
        firmware (``GET_PVMFW_SIZE``); None: asking is a :class:`ModelGap`.
    :param check_extension: False models a driver without ``GZVM_CHECK_EXTENSION``
        (the plugin must refuse it).
    """

    def __init__(self, *, gpa_bits: int = 48, pvmfw_size: int | None = None, check_extension: bool = True) -> None:
        super().__init__()
        self.gpa_bits = gpa_bits
        self.pvmfw_size = pvmfw_size
        self.check_extension = check_extension
        self.devices["/dev/gzvm"] = DeviceFile
        self.vms: list[ModelVm] = []
        self.stats = ModelStats()
        self.hypervisor = Hypervisor(self)

    def on_signal(self, thread_id: int) -> None:
        # A signal is a host interrupt: the hypervisor returns GZVM_EXIT_IRQ from a
        # guest running on that thread; a sleeping one sees it in sleep_until.
        for vm in list(self.vms):
            for vcpu in list(vm.vcpus.values()):
                if vcpu.running_on == thread_id and vcpu.hv.cpu is not None:
                    vcpu.hv.cpu.kick()

    def answer_check_extension(self, arg: int) -> int:
        """``gzvm_dev_ioctl_check_extension``: the capability is read through the
        pointer and the answer written back through it."""
        (cap,) = U64.unpack(self.copy_from_user(arg, U64.size))
        if cap == CAP_PROTECTED_VM:
            self.copy_to_user(arg, U64.pack(1))
            return 0
        if cap == CAP_VM_GPA_SIZE:
            self.copy_to_user(arg, U64.pack(self.gpa_bits))
            return 0
        return -errno.EOPNOTSUPP  # an unknown capability: the normal "no", not a broken rule

    @contextmanager
    def installed(self) -> Iterator[GenieZoneModel]:
        """Install the model as pyvmm-geniezone's seam for the block."""
        from pyvmm_geniezone.host import HOST

        with HOST.use(self):
            yield self


class DeviceFile(FileObject):
    """An open ``/dev/gzvm``."""

    kind = "gzvm"
    model: GenieZoneModel

    def dispatch(self, request: int, arg: int) -> int:
        if request == GZVM_CHECK_EXTENSION and not self.model.check_extension:
            raise RuleViolation(NO_SUCH_IOCTL, "this driver has no GZVM_CHECK_EXTENSION")
        return super().dispatch(request, arg)

    @handles(GZVM_CREATE_VM, "GZVM_CREATE_VM")
    def create_vm(self, arg: int) -> int:
        if arg != 0:
            raise self.model.not_modelled(f"the hypervisor's answer to VM type {arg} (gzvm_arch_create_vm)")
        vm = ModelVm(self.model, vm_id=len(self.model.vms) + 1)
        with self.model.lock:
            self.model.vms.append(vm)
        return self.model.install(vm)

    @handles(GZVM_CHECK_EXTENSION, "GZVM_CHECK_EXTENSION")
    def check_extension(self, arg: int) -> int:
        if not arg:
            raise RuleViolation(R_CHECK_EXTENSION_NULL, "arg 0")
        return self.model.answer_check_extension(arg)


@dataclass
class Slot:
    slot: int
    flags: int
    gpa: int
    size: int
    host_addr: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass
class Irqfd:
    fd: int
    eventfd_id: str
    gsi: int


@dataclass
class IoEvent:
    addr: int
    length: int
    eventfd_id: str
    fd: int
    datamatch: int
    wildcard: bool

    def clashes(self, other: IoEvent) -> bool:
        """``ioeventfd_check_collision`` of ``other`` (the new one) against this:
        the same address with either length 0, or the same length and either a
        wildcard or the same data -- or ``other``'s address inside this range."""
        if self.addr == other.addr:
            if not self.length or not other.length:  # behaviour: collision-any-length
                return True
            if self.length == other.length and (self.wildcard or other.wildcard or self.datamatch == other.datamatch):
                return True
        return self.addr <= other.addr < self.addr + self.length  # behaviour: collision-inside-range

    def hit(self, addr: int, length: int, value: int) -> bool:
        """``gzvm_ioevent_in_range`` for a guest write."""
        if addr != self.addr:
            return False
        if not self.length:  # behaviour: ioevent-any-length
            return True
        if length != self.length:
            return False
        return self.wildcard or value == self.datamatch


def _eventfd_id(fd: int) -> str | None:
    """The eventfd's identity (its context, as the kernel compares them), from
    ``/proc/self/fdinfo``; None when ``fd`` is no eventfd."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
            for line in info:
                if line.startswith("eventfd-id:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return f"fd{fd}" if DeviceFileModel.is_eventfd(fd) else None


def _fd_open(fd: int) -> bool:
    """``fdget``: whether ``fd`` is open in this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _mappings() -> Iterator[tuple[int, int, str]]:
    """This process's mappings: start, end and permissions (``rw-p``...)."""
    with open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            start_text, _, rest = line.partition("-")
            end_text, perms = rest.split(maxsplit=2)[:2]
            yield int(start_text, 16), int(end_text, 16), perms


def vma_holding(address: int) -> tuple[int, int] | None:
    """``vma_lookup`` on this process: the mapping holding ``address``."""
    for start, end, _ in _mappings():
        if start <= address < end:
            return start, end
    return None


def first_unpinnable(address: int, size: int) -> int | None:
    """``pin_user_pages(FOLL_WRITE)`` page by page over ``[address, address +
    size)``: the first address no writable mapping covers, or None."""
    stop = address + size
    for start, end, perms in _mappings():
        if address >= stop:
            return None
        if end <= address:
            continue
        if start > address or "w" not in perms:
            return address
        address = end
    return address if address < stop else None


class ModelVm(FileObject):
    """A VM fd: the driver's ``struct gzvm`` and the hypervisor's VM."""

    kind = "gzvm-vm"
    model: GenieZoneModel

    def __init__(self, model: GenieZoneModel, vm_id: int) -> None:
        super().__init__(model)
        self.vm_id = vm_id
        self.slots: dict[int, Slot] = {}
        self.vcpus: dict[int, ModelVcpu] = {}
        self.devices: dict[int, tuple[int, int]] = {}
        self.irqfds: list[Irqfd] = []
        self.ioevents: list[IoEvent] = []
        self.dtb: tuple[int, int] | None = None
        self.protected = False
        self.pvmfw_gpa: int | None = None
        #: The hypervisor's vGIC, made when the first vCPU runs (it needs the count).
        self.gic: Gic | None = None
        #: The guest ran: from here memory and vCPUs are the hypervisor's business.
        self.started = False
        #: ``idle_events.virtio_irq``: a wake-up for every sleeping vCPU.
        self.wake_generation = 0

    # --- capabilities ---------------------------------------------------------------
    @handles(GZVM_CHECK_EXTENSION, "GZVM_CHECK_EXTENSION")
    def check_extension(self, arg: int) -> int:
        # The VM fd has no NULL test: 0 is a bad pointer (EFAULT).
        return self.model.answer_check_extension(arg)

    @handles(GZVM_ENABLE_CAP, "GZVM_ENABLE_CAP")
    def enable_cap(self, arg: int) -> int:
        cap, *args = ENABLE_CAP.unpack(self.model.copy_from_user(arg, ENABLE_CAP.size))
        if cap in (CAP_ENABLE_DEMAND_PAGING, CAP_BLOCK_BASED_DEMAND_PAGING):
            raise self.model.not_modelled("demand paging asked for by the VMM (the hypervisor's answer)")
        if cap == CAP_ENABLE_IDLE:
            # Forwarded like demand paging; the driver already asks at VM creation
            # (gzvm_vm.c enable_idle_support).
            raise self.model.not_modelled("ENABLE_IDLE asked for by the VMM (the hypervisor's answer)")
        if cap != CAP_PROTECTED_VM:
            raise RuleViolation(R_ENABLE_CAP, f"cap {cap:#x}")
        command = args[0]
        if command not in (PVM_SET_PVMFW_GPA, PVM_GET_PVMFW_SIZE, PVM_SET_PROTECTED_VM):
            raise RuleViolation(R_PVM_SUBCOMMAND, f"args[0] {command}")
        if command == PVM_GET_PVMFW_SIZE:
            if self.model.pvmfw_size is None:
                raise self.model.not_modelled("the size of the hypervisor's protected-VM firmware (pvmfw_size)")
            args[1] = self.model.pvmfw_size
            self.model.copy_to_user(arg, ENABLE_CAP.pack(cap, *args))
            return 0
        # SET_PVMFW_GPA or SET_PROTECTED_VM: the VM is protected from here.
        self.protected = True
        if command == PVM_SET_PVMFW_GPA:
            self.pvmfw_gpa = args[1]
        return 0

    # --- memory ---------------------------------------------------------------------
    @handles(GZVM_SET_USER_MEMORY_REGION, "GZVM_SET_USER_MEMORY_REGION")
    def set_user_memory_region(self, arg: int) -> int:
        slot, flags, gpa, size, uva = MEM_REGION.unpack(self.model.copy_from_user(arg, MEM_REGION.size))
        if slot >= MAX_MEM_REGION:
            raise RuleViolation(R_MEM_SLOT, f"slot {slot}")
        page = HOST_PAGE
        if gpa % page or size % page:
            raise RuleViolation(R_MEM_ALIGN, f"gpa {gpa:#x} size {size:#x}")
        if gpa + size > _U64:
            raise RuleViolation(R_MEM_WRAP, f"{gpa:#x}+{size:#x}")
        if size // page > MEM_MAX_NR_PAGES:
            raise RuleViolation(R_MEM_PAGES, f"{size // page} pages")
        vma = vma_holding(uva)
        if vma is None:
            raise RuleViolation(R_MEM_NO_VMA, f"userspace_addr {uva:#x}")
        if vma[1] - vma[0] != size:
            raise RuleViolation(R_MEM_VMA_SIZE, f"the mapping {vma[0]:#x}-{vma[1]:#x} is not {size:#x} bytes")
        with self.model.lock:
            if self.started:
                raise self.model.not_modelled("memory given to a VM whose guest already ran")
            if slot in self.slots:
                raise self.model.not_modelled(f"slot {slot} registered again (the hypervisor's answer)")
            for other in self.slots.values():
                if gpa < other.end and other.gpa < gpa + size:
                    raise self.model.not_modelled(f"slot {slot} overlapping slot {other.slot} (hypervisor's answer)")
            # The driver records the slot and registers it with the hypervisor,
            # then pins the pages and hands them over (fully populated).
            self.slots[slot] = Slot(slot, flags, gpa, size, uva)
        unpinnable = first_unpinnable(uva, size)
        if unpinnable is not None:
            # The slot stays recorded and registered: the driver does not undo it.
            raise RuleViolation(R_MEM_PIN, f"{unpinnable:#x} is not mapped writable")
        return 0

    # --- vCPUs and devices ------------------------------------------------------------
    @handles(GZVM_CREATE_VCPU, "GZVM_CREATE_VCPU")
    def create_vcpu(self, arg: int) -> int:
        # gzvm_vm_ioctl_create_vcpu takes the ioctl's argument as a u32 cpuid.
        cpuid = arg & 0xFFFFFFFF
        if cpuid >= MAX_VCPUS:
            raise RuleViolation(R_VCPU_ID, f"id {cpuid}")
        with self.model.lock:
            if cpuid in self.vcpus:
                raise self.model.not_modelled(f"vCPU id {cpuid} created twice (the hypervisor's answer)")
            if self.gic is not None:
                raise self.model.not_modelled("a vCPU created after the vGIC was laid out (the guest ran)")
            vcpu = ModelVcpu(self, cpuid)
            self.vcpus[cpuid] = vcpu
        return self.model.install(vcpu)

    @handles(GZVM_CREATE_DEVICE, "GZVM_CREATE_DEVICE")
    def create_device(self, arg: int) -> int:
        dev_type, _, flags, address, size, attr_addr, attr_size = CREATE_DEVICE.unpack(
            self.model.copy_from_user(arg, CREATE_DEVICE.size)
        )
        if attr_addr and attr_size:
            if attr_size > HOST_PAGE:
                raise RuleViolation(R_DEVICE_ATTR_SIZE, f"attr_size {attr_size:#x}")
            self.model.copy_from_user(attr_addr, attr_size)
            raise self.model.not_modelled("device attributes (what the hypervisor does with them)")
        if dev_type not in (DEV_VGIC_V3_DIST, DEV_VGIC_V3_REDIST) or flags:
            raise self.model.not_modelled(f"device type {dev_type} with flags {flags:#x} (the hypervisor's answer)")
        with self.model.lock:
            if dev_type in self.devices or self.gic is not None:
                raise self.model.not_modelled(f"device type {dev_type} created twice, or after the guest ran")
            self.devices[dev_type] = (address, size)
        return 0

    def vgic(self) -> Gic | None:
        """The hypervisor's vGIC, laid out on first use: the distributor where
        CREATE_DEVICE put it, one redistributor (two 64 KiB frames) per vCPU from
        the redistributor device's address (crosvm passes one redistributor's size
        whatever the vCPU count)."""
        with self.model.lock:
            if self.gic is not None or not self.devices:
                return self.gic
            if set(self.devices) != {DEV_VGIC_V3_DIST, DEV_VGIC_V3_REDIST}:
                raise self.model.not_modelled("a vGIC with only a distributor or only redistributors")
            if sorted(self.vcpus) != list(range(len(self.vcpus))) or not self.vcpus:
                raise self.model.not_modelled("a vGIC for vCPU ids that are not 0..n-1")
            dist, dist_size = self.devices[DEV_VGIC_V3_DIST]
            redist, redist_size = self.devices[DEV_VGIC_V3_REDIST]
            if dist_size != GICD_SIZE or redist_size != GICR_STRIDE:
                raise self.model.not_modelled(f"vGIC frames of {dist_size:#x}/{redist_size:#x} bytes")
            self.gic = Gic(len(self.vcpus), spis=VGIC_SPIS, distributor_base=dist, redistributor_base=redist)
            return self.gic

    # --- interrupts ---------------------------------------------------------------------
    @handles(GZVM_IRQ_LINE, "GZVM_IRQ_LINE")
    def irq_line(self, arg: int) -> int:
        irq, level = IRQ_LEVEL.unpack(self.model.copy_from_user(arg, IRQ_LEVEL.size))
        # The driver passes the vCPU fields and the number on; the type is dropped.
        vcpu_index = (irq >> 16 & 0xFF) + (irq >> 28 & 0xF) * 256
        number = irq & 0xFFFF
        if vcpu_index:
            raise self.model.not_modelled(f"an interrupt line aimed at vCPU {vcpu_index}")
        self.inject_irq(number, bool(level))
        return 0

    def inject_irq(self, number: int, level: bool) -> None:
        """``gzvm_vm.c gzvm_irqchip_inject_irq``, for ``GZVM_IRQ_LINE`` and
        irqfds alike: every vCPU's ``idle_events.virtio_irq`` is bumped
        (``gzvm_vcpu_wakeup_all``) -- whatever the level -- then the line goes to
        the hypervisor."""
        with self.model.lock:
            self.wake_generation += 1  # behaviour: injection-wakes-idle-vcpus
        self.model.notify()
        self.raise_spi(number, level)

    def raise_spi(self, number: int, level: bool) -> None:
        """``gzvm_arch_inject_irq``: SPI index ``number`` (the hypervisor adds 32).
        Raising makes it pending.  Lowering a line that is not pending changes
        nothing, edge- or level-sensitive (GICv3); lowering one still pending
        clears it if the guest made it level-sensitive and not if edge -- a
        configuration the model's vGIC does not keep: a ModelGap."""
        gic = self.vgic()
        if gic is None:
            raise self.model.not_modelled("an interrupt injected into a VM without a vGIC")
        if number >= VGIC_SPIS:
            raise self.model.not_modelled(f"SPI index {number} beyond the {VGIC_SPIS} the model's vGIC has")
        if not level:
            if gic.spis[number].pending:  # behaviour: lowering-a-pending-spi-is-a-gap
                raise self.model.not_modelled(f"lowering SPI index {number} while it is pending (edge or level?)")
            return
        target = gic.set_spi(32 + number)
        self.model.stats.spis_raised += 1
        for vcpu in list(self.vcpus.values()):
            # The interrupt reaches a running guest with the host interrupt that
            # makes it look at its GIC; a sleeping one is woken below.
            if vcpu.id == target and vcpu.running_on not in (None, threading.get_ident()):
                vcpu.interrupt()
        self.model.notify()

    @handles(GZVM_IRQFD, "GZVM_IRQFD")
    def irqfd(self, arg: int) -> int:
        fd, gsi, flags, resamplefd, pad = IRQFD.unpack(self.model.copy_from_user(arg, IRQFD.size))
        if any(pad):
            raise RuleViolation(R_IRQFD_PAD, "pad")
        if flags & ~(IRQFD_DEASSIGN | IRQFD_RESAMPLE):
            raise RuleViolation(R_IRQFD_FLAGS, f"flags {flags:#x}")
        # gzvm_irqfd_assign: fdget + eventfd_ctx_fileget; deassign: eventfd_ctx_fdget.
        if not _fd_open(fd):
            raise RuleViolation(R_EVENTFD_BADF, f"irqfd fd {fd}")
        identity = _eventfd_id(fd)
        if identity is None:
            raise RuleViolation(R_NOT_EVENTFD, f"irqfd fd {fd}")
        if flags & IRQFD_DEASSIGN:
            with self.model.lock:
                # Every irqfd of this eventfd and gsi goes; none is not an error.
                self.irqfds = [i for i in self.irqfds if not (i.eventfd_id == identity and i.gsi == gsi)]
            return 0
        if flags & IRQFD_RESAMPLE:
            # eventfd_ctx_fdget, before the busy check: its errors win over EBUSY.
            if not _fd_open(resamplefd):
                raise RuleViolation(R_RESAMPLEFD_BADF, f"resamplefd {resamplefd}")
            if _eventfd_id(resamplefd) is None:
                raise RuleViolation(R_RESAMPLEFD_NOT_EVENTFD, f"resamplefd {resamplefd}")
        with self.model.lock:
            if any(i.eventfd_id == identity for i in self.irqfds):
                raise RuleViolation(R_IRQFD_BUSY, f"fd {fd}")
            # RESAMPLE is accepted; nothing lowers the line or signals the
            # resample fd: the ACK driver never calls gzvm_notify_acked_irq
            # (earlier versions of the series did, from gzvm_sync_vgic_state).
            self.irqfds.append(Irqfd(fd, identity, gsi))
            # gzvm_irqfd_assign: a count already in the eventfd (vfs_poll says
            # EPOLLIN) raises the SPI now.  The driver leaves the count in place
            # and the next write's irqfd_wakeup reads both; the model reads it
            # here, which raises the line the same number of times.
            earlier = self.model.drain_eventfd(fd)
        if earlier:  # behaviour: irqfd-raises-earlier-count
            self.inject_irq(gsi, True)
        return 0

    def poll_irqfds(self) -> bool:
        """``irqfd_wakeup`` for every eventfd written since the last look: the
        driver reads the count and raises the SPI on vCPU 0; every sleeping vCPU
        wakes (``idle_events.virtio_irq``).  True if any was written."""
        written = False
        for irqfd in list(self.irqfds):
            if self.model.drain_eventfd(irqfd.fd):  # behaviour: irqfd-write-injects
                written = True
                self.inject_irq(irqfd.gsi, True)
        return written

    @handles(GZVM_IOEVENTFD, "GZVM_IOEVENTFD")
    def ioeventfd(self, arg: int) -> int:
        datamatch, addr, length, fd, flags, _ = IOEVENTFD.unpack(self.model.copy_from_user(arg, IOEVENTFD.size))
        if length not in (0, 1, 2, 4, 8):
            raise RuleViolation(R_IOEVENTFD_LEN, f"len {length}")
        if addr + length > _U64:
            raise RuleViolation(R_IOEVENTFD_WRAP, f"{addr:#x}+{length}")
        if flags & ~IOEVENTFD_VALID_FLAGS:
            raise RuleViolation(R_IOEVENTFD_FLAGS, f"flags {flags:#x}")
        if not length and flags & IOEVENTFD_DATAMATCH:
            raise RuleViolation(R_IOEVENTFD_DATAMATCH_LEN, f"addr {addr:#x}")
        if flags & IOEVENTFD_PIO:
            raise RuleViolation(R_IOEVENTFD_PIO, f"addr {addr:#x}")
        # eventfd_ctx_fdget, in both gzvm_assign_ioeventfd and gzvm_deassign_ioeventfd.
        if not _fd_open(fd):
            raise RuleViolation(R_EVENTFD_BADF, f"ioeventfd fd {fd}")
        identity = _eventfd_id(fd)
        if identity is None:
            raise RuleViolation(R_NOT_EVENTFD, f"ioeventfd fd {fd}")
        wildcard = not flags & IOEVENTFD_DATAMATCH
        event = IoEvent(addr, length, identity, fd, 0 if wildcard else datamatch, wildcard)
        with self.model.lock:
            if flags & IOEVENTFD_DEASSIGN:
                for old in self.ioevents:
                    same = (old.eventfd_id, old.addr, old.length, old.wildcard) == (identity, addr, length, wildcard)
                    if same and (old.wildcard or old.datamatch == datamatch):  # behaviour: deassign-matches-data
                        self.ioevents.remove(old)
                        return 0
                raise RuleViolation(R_IOEVENTFD_NOENT, f"addr {addr:#x} len {length}")
            if any(old.clashes(event) for old in self.ioevents):
                raise RuleViolation(R_IOEVENTFD_COLLISION, f"addr {addr:#x} len {length}")
            self.ioevents.append(event)
        return 0

    def ioevent_write(self, addr: int, length: int, value: int) -> bool:
        """``gzvm_ioevent_write``: signal the first ioeventfd the write hits."""
        for event in list(self.ioevents):
            if event.hit(addr, length, value):
                self.model.signal_eventfd(event.fd)
                self.model.stats.ioevents_signalled += 1
                return True
        return False

    # --- the device tree ------------------------------------------------------------------
    @handles(GZVM_SET_DTB_CONFIG, "GZVM_SET_DTB_CONFIG")
    def set_dtb_config(self, arg: int) -> int:
        # Forwarded to the hypervisor (gzvm_arch_set_dtb_config); its checks are not visible.
        self.dtb = DTB_CONFIG.unpack(self.model.copy_from_user(arg, DTB_CONFIG.size))
        return 0

    # --- lifetime ---------------------------------------------------------------------------
    def release(self) -> None:
        """``gzvm_destroy_vm``: irqfds go, every vCPU is destroyed -- also those
        whose fds are still open (they hold no reference to the VM)."""
        with self.model.lock:
            open_vcpus = [v for v in self.vcpus.values() if not v.closed]
            self.irqfds.clear()
            self.ioevents.clear()
            if self in self.model.vms:
                self.model.vms.remove(self)
        if open_vcpus:
            self.model.advise(R_VM_CLOSED_FIRST, f"vCPU(s) {', '.join(str(v.id) for v in open_vcpus)} still open")
        for vcpu in list(self.vcpus.values()):
            vcpu.destroy()


@dataclass
class HvVcpu:
    """The hypervisor's vCPU state."""

    powered_on: bool
    #: Registers set before the software CPU exists.
    registers: dict[int, int] = field(default_factory=dict)
    cpu: GuestCpu | None = None
    power_request: tuple[int, int] | None = None
    #: What the next entry completes: ("mmio", size) or ("hypercall", 0).
    pending: tuple[str, int] | None = None
    #: The VM shut down or reset through this vCPU.
    down: bool = False


class ModelVcpu(FileObject):
    """A vCPU fd: the driver's ``struct gzvm_vcpu``."""

    kind = "gzvm-vcpu"
    model: GenieZoneModel

    def __init__(self, vm: ModelVm, vcpu_id: int) -> None:
        super().__init__(vm.model)
        self.vm = vm
        self.id = vcpu_id
        # The hypervisor powers on vCPU 0; the others wait for PSCI CPU_ON.
        self.hv = HvVcpu(powered_on=vcpu_id == 0)
        self.running_on: int | None = None
        self.destroyed = False
        self._interrupt = threading.Event()
        self._seen_wake = 0

    def dispatch(self, request: int, arg: int) -> int:
        if self.destroyed:
            raise self.model.not_modelled("a vCPU fd used after its VM was closed (freed memory in the driver)")
        return super().dispatch(request, arg)

    def interrupt(self) -> None:
        """Wake the vCPU: out of a sleep, or out of the guest (a host interrupt)."""
        self._interrupt.set()
        if self.hv.cpu is not None and self.running_on is not None:
            self.hv.cpu.kick()

    # --- registers ------------------------------------------------------------------
    @handles(GZVM_GET_ONE_REG, "GZVM_GET_ONE_REG")
    def get_one_reg(self, arg: int) -> int:
        return self._one_reg(arg, is_write=False)

    @handles(GZVM_SET_ONE_REG, "GZVM_SET_ONE_REG")
    def set_one_reg(self, arg: int) -> int:
        return self._one_reg(arg, is_write=True)

    def _one_reg(self, arg: int, *, is_write: bool) -> int:
        """``gzvm_vcpu_ioctl``: GET is refused before its argument is read; SET is
        ``gzvm_vcpu_update_one_reg``."""
        if not is_write:
            raise RuleViolation(R_GET_ONE_REG, "GZVM_GET_ONE_REG")
        reg_id, address = ONE_REG.unpack(self.model.copy_from_user(arg, ONE_REG.size))
        size = 1 << ((reg_id & REG_SIZE_MASK) >> REG_SIZE_SHIFT)
        if size not in (1, 2, 4, 8):
            raise RuleViolation(R_ONE_REG_SIZE, f"id {reg_id:#x}: {size} bytes")
        value = int.from_bytes(self.model.copy_from_user(address, size), "little")
        if reg_id & ~0xFFFF != REG_ARM64 | 0x0030000000000000 | REG_ARM_CORE:
            raise self.model.not_modelled(f"register {reg_id:#x}: the hypervisor's answer to a non-core/sub-64-bit id")
        if self.running_on is not None:
            raise self.model.not_modelled("a register set while the vCPU runs on another thread")
        cpu = self.hv.cpu
        try:
            if cpu is None:
                Aarch64VcpuInit(regs={reg_id: value})  # an id the software CPU knows?
                self.hv.registers[reg_id] = value
            else:
                cpu.engine.set_one_reg(reg_id, value)
        except ConfigError as exc:
            raise self.model.not_modelled(f"register {reg_id:#x} ({exc})") from None
        return 0

    # --- GZVM_RUN ---------------------------------------------------------------------
    @handles(GZVM_RUN, "GZVM_RUN")
    def run(self, arg: int) -> int:
        """``gzvm_vcpu_run``: copy the VMM's struct in, check it, run the guest until
        an exit needs userspace or a signal is pending, copy it out, and turn a
        pending signal into ``-ERESTARTSYS``."""
        run = bytearray(self.model.copy_from_user(arg, RUN_SIZE))
        if any(run[RUN_PADDING1]):
            raise RuleViolation(R_RUN_PADDING, bytes(run[RUN_PADDING1]).hex())
        if run[RUN_IMMEDIATE_EXIT] == 1:  # behaviour: immediate-exit-at-entry
            return -errno.EINTR
        me = threading.get_ident()
        with self.model.lock:
            if self.running_on is not None:
                raise self.model.not_modelled("two threads running one vCPU at once (the driver takes no lock)")
            self.running_on = me
        try:
            need_userspace = False
            while not need_userspace and not self.model.signal_pending():  # behaviour: loop-checks-signals
                reason = self.model.hypervisor.vcpu_run(self, run)
                self.model.checkpoint(HYPERVISOR_RETURNED)
                need_userspace = self._driver_handles(reason, run)
        finally:
            self.running_on = None
        self.model.copy_to_user(arg, bytes(run))
        if self.model.signal_pending():  # behaviour: signal-after-copy-out
            return -ERESTARTSYS
        return 0

    def _driver_handles(self, reason: int, run: bytearray) -> bool:
        """The driver's switch on the exit: True when it needs userspace."""
        if reason == EXIT_MMIO:
            address, data, size, _, is_write = MMIO_LAYOUT.unpack_from(run, RUN_UNION)
            if not is_write:
                return True
            value = int.from_bytes(data[:size], "little")
            return not self.vm.ioevent_write(address, size, value)  # behaviour: ioevent-absorbs-write
        if reason == EXIT_HYPERCALL:
            function = HYPERCALL_ARGS.unpack_from(run, RUN_UNION)[0]
            if function == HVC_MEM_RELINQUISH:
                # gzvm_handle_guest_hvc -> gzvm_handle_relinquish: forgets the
                # pinned page at args[1] and always returns 0: handled, loop on.
                return False  # behaviour: relinquish-stays-in-driver
            if function == HVC_PTP:
                raise self.model.not_modelled("the driver's PTP answer (the host's wall clock and counters)")
            return True
        if reason in (EXIT_IRQ, EXIT_GZ):
            return False
        if reason == EXIT_IDLE:
            self._idle()
            return False
        return True

    def _idle(self) -> None:
        """``gzvm_handle_guest_idle``: the vCPU sleeps until an interrupt for it,
        the virtual timer, an injection's wake-up (``virtio_irq``: an irqfd or
        ``GZVM_IRQ_LINE``) or a signal.  (With no timer armed
        the driver goes straight back to the hypervisor, which reports IDLE again:
        the vCPU stays in the driver either way; the model sleeps instead of
        spinning.)"""
        self.model.stats.idle_sleeps += 1
        hv = self.hv
        self.model.sleep_until(
            lambda: self._wake_pending(hv), f"an interrupt for vCPU {self.id}", poll=self._poll_interval()
        )

    def _wake_pending(self, hv: HvVcpu) -> bool:
        self.vm.poll_irqfds()
        if self.vm.wake_generation != self._seen_wake:  # behaviour: idle-wakes-on-virtio-irq
            self._seen_wake = self.vm.wake_generation
            return True
        if self._interrupt.is_set():
            self._interrupt.clear()
            return True
        return self.model.hypervisor.wakeup(hv)

    def _poll_interval(self) -> float:
        gic = self.vm.gic
        deadline = gic.cpus[self.id].timer_deadline() if gic is not None else None
        return IRQFD_POLL if deadline is None else max(0.0001, min(IRQFD_POLL, deadline))

    # --- lifetime ---------------------------------------------------------------------
    def destroy(self) -> None:
        """``gzvm_destroy_vcpu`` (at the VM's release)."""
        self.destroyed = True
        if self.hv.cpu is not None:
            self.hv.cpu.close()
            self.hv.cpu = None

    def release(self) -> None:
        """The vCPU fd's last close: the driver has no release for it (the vCPU
        lives until the VM goes)."""


class _Stop(VcpuExit):
    """How the hypercall handler ends a run: the exit reason the hypervisor
    reports, with the system event's type or the hypercall's X0..X7."""

    __slots__ = ("args", "event", "reason")
    kind = ExitKind.HYPERCALL

    def __init__(self, reason: int, event: int = 0, args: tuple[int, ...] = ()) -> None:
        self.reason = reason
        self.event = event
        self.args = args


class Hypervisor:
    """The hypervisor's side of ``MT_HVC_GZVM_RUN``: run the guest on the software
    CPU and return the exit reason, filling the driver's copy of the run struct."""

    def __init__(self, model: GenieZoneModel) -> None:
        self.model = model

    def vcpu_run(self, vcpu: ModelVcpu, run: bytearray) -> int:
        """One ``MT_HVC_GZVM_RUN``: the exit reason, also written into the run
        struct -- for the exits the driver keeps (IRQ, IDLE) too: the struct is
        the hypervisor's to fill (``gzvm_vcpu.c gzvm_vcpu_run``), and crosvm's
        ``GeniezoneVcpu::run`` reads ``GZVM_EXIT_IRQ`` from it.  A signal that
        ends the driver's loop after such an exit copies it out to the VMM."""
        reason = self._enter(vcpu, run)
        struct.pack_into("<I", run, RUN_EXIT_REASON, reason)  # behaviour: hypervisor-writes-exit-reason
        return reason

    def _enter(self, vcpu: ModelVcpu, run: bytearray) -> int:
        vm, hv = vcpu.vm, vcpu.hv
        self.model.stats.hypervisor_entries += 1
        if vm.protected:
            raise self.model.not_modelled("running a protected VM (what the hypervisor hides from the host)")
        if hv.down:
            raise self.model.not_modelled("running a vCPU again after its VM shut down or reset")
        with self.model.lock:
            vm.started = True
        vm.vgic()
        vm.poll_irqfds()
        if hv.power_request is not None:
            self._power_on(hv, *hv.power_request)
        if not hv.powered_on:  # behaviour: powered-off-vcpu-idles
            return EXIT_IDLE
        cpu = self._cpu(vm, vcpu)
        pending, hv.pending = hv.pending, None
        if pending is not None and pending[0] == "mmio":  # behaviour: mmio-read-completed-from-run
            cpu.complete_read(bytes(run[RUN_MMIO_DATA : RUN_MMIO_DATA + pending[1]]))
        elif pending is not None:
            # hvc.c gzvm_handle_ptp_time: hypercall.args[0..3] go back in X0..X3.
            args = HYPERCALL_ARGS.unpack_from(run, RUN_UNION)
            for n in range(4):
                cpu.engine.set_one_reg(x_reg_id(n), args[n])
        # A kick from a signal the driver already delivered is spent; a new one
        # still stops the run.
        cpu.discard_kick()
        if self.model.signal_pending():
            return EXIT_IRQ
        exit_ = cpu.run()
        while isinstance(exit_, MmioExit) and self._vgic_access(vm, cpu, exit_):
            exit_ = cpu.run()  # the vGIC is the hypervisor's: no exit
        if isinstance(exit_, MmioExit):
            data = bytes(exit_.data[: exit_.size]) if exit_.is_write else bytes(run[RUN_MMIO_DATA : RUN_MMIO_DATA + 8])
            # reg_nr: the model does not decode the access's register (0).
            MMIO_LAYOUT.pack_into(run, RUN_UNION, exit_.address, data.ljust(8, b"\0"), exit_.size, 0, exit_.is_write)
            if not exit_.is_write:
                hv.pending = ("mmio", exit_.size)
            return EXIT_MMIO
        if isinstance(exit_, _Stop):
            if exit_.reason == EXIT_SYSTEM_EVENT:
                hv.down = True
                SYSTEM_EVENT_LAYOUT.pack_into(run, RUN_UNION, exit_.event, 0)
            else:
                HYPERCALL_ARGS.pack_into(run, RUN_UNION, *(a & _U64 for a in exit_.args))
                hv.pending = ("hypercall", 0)
            return exit_.reason
        if exit_ is _POWERED_OFF or exit_.kind is ExitKind.HLT:
            return EXIT_IDLE  # WFI or PSCI CPU_OFF: the hypervisor reports the vCPU idle
        if exit_.kind is ExitKind.INTERRUPTED:
            return EXIT_IRQ  # a host interrupt (a signal, a kick) preempted the guest
        if isinstance(exit_, InternalErrorExit):
            raise self.model.not_modelled(f"delivering a guest exception ({exit_.description})")
        raise self.model.not_modelled(f"a software-CPU exit of kind {exit_.kind.name} under GenieZone")

    def wakeup(self, hv: HvVcpu) -> bool:
        """Whether a sleeping ``hv`` has something to wake for: a PSCI CPU_ON, or
        an interrupt its GIC CPU interface signals (a raised SPI, the virtual
        timer's PPI once due)."""
        if hv.power_request is not None:
            return True
        return hv.cpu is not None and hv.powered_on and hv.cpu.irq_signalled()

    @staticmethod
    def _vgic_access(vm: ModelVm, cpu: GuestCpu, exit_: MmioExit) -> bool:
        gic = vm.gic
        if gic is None or not gic.contains(exit_.address):  # behaviour: vgic-owns-its-frames
            return False
        if exit_.is_write:
            gic.mmio_write(exit_.address, exit_.size, int.from_bytes(bytes(exit_.data[: exit_.size]), "little"))
        else:
            value = gic.mmio_read(exit_.address, exit_.size) & ((1 << 8 * exit_.size) - 1)
            cpu.complete_read(value.to_bytes(exit_.size, "little"))
        return True

    def _cpu(self, vm: ModelVm, vcpu: ModelVcpu) -> GuestCpu:
        hv = vcpu.hv
        if hv.cpu is None:
            if PC_ID not in hv.registers:
                raise self.model.not_modelled(f"vCPU {vcpu.id}'s reset state (no PC was set with GZVM_SET_ONE_REG)")
            for slot in vm.slots.values():
                if slot.flags != MEM_GUEST:
                    raise self.model.not_modelled(f"slot {slot.slot} of purpose {slot.flags:#x} in an unprotected VM")
            cpu = GuestCpu("aarch64", hypercalls=lambda _engine, call: self._hypercall(vm, vcpu, call))
            for slot in vm.slots.values():
                cpu.map(slot.gpa, slot.size, slot.host_addr)
            if vm.gic is not None:
                cpu.attach_gic(vm.gic.cpus[vcpu.id])
            cpu.init(Aarch64VcpuInit(regs=dict(hv.registers)))
            hv.cpu = cpu
        return hv.cpu

    @staticmethod
    def _power_on(hv: HvVcpu, entry: int, context_id: int) -> None:
        """PSCI CPU_ON took effect: the vCPU starts at ``entry``, X0 = context id,
        EL1h with DAIF masked (Arm DEN0022 §6.4)."""
        hv.power_request = None
        hv.powered_on = True
        regs = {PC_ID: entry, PSTATE_ID: PSTATE_EL1H_DAIF, x_reg_id(0): context_id}
        if hv.cpu is None:
            hv.registers.update(regs)
        else:
            hv.cpu.init(Aarch64VcpuInit(regs=regs))

    # --- HVC: what GenieZone answers itself -----------------------------------------------
    def _hypercall(self, vm: ModelVm, vcpu: ModelVcpu, call: Hypercall) -> VcpuExit | bool:
        function = call.function & 0xFFFFFFFF
        if call.conduit.name != "HVC":
            raise self.model.not_modelled(f"an SMC from the guest (function {function:#x})")
        if function == HVC_MEM_RELINQUISH:
            raise self.model.not_modelled("MEM_RELINQUISH from the guest (what the hypervisor does with the page)")
        if not _is_psci(function):  # behaviour: non-psci-goes-to-vmm
            # Not the hypervisor's: the driver sees GZVM_EXIT_HYPERCALL with X0..X7.
            return _Stop(EXIT_HYPERCALL, args=(call.function, *call.args))
        self.model.stats.psci_calls.append(function)
        if function == PSCI_SYSTEM_OFF:
            return _Stop(EXIT_SYSTEM_EVENT, SYSTEM_EVENT_SHUTDOWN)
        if function == PSCI_SYSTEM_RESET:
            return _Stop(EXIT_SYSTEM_EVENT, SYSTEM_EVENT_RESET)
        if function == PSCI_CPU_OFF:
            vcpu.hv.powered_on = False
            return _POWERED_OFF
        if function in PSCI_CPU_ON:
            result = self._cpu_on(vm, call.args[0], call.args[1], call.args[2])
        elif function in PSCI_AFFINITY_INFO:
            result = self._affinity(vm, call.args[0])
        elif function == PSCI_VERSION:
            result = PSCI_VERSION_0_2
        else:
            raise self.model.not_modelled(f"PSCI function {function:#x} (the hypervisor's answer)")
        assert vcpu.hv.cpu is not None
        vcpu.hv.cpu.engine.set_one_reg(x_reg_id(0), result & _U64)
        return True

    @staticmethod
    def _affinity(vm: ModelVm, target: int) -> int:
        other = vm.vcpus.get(target) if target < MAX_VCPUS else None
        if other is None:
            return PSCI_INVALID_PARAMETERS
        return AFFINITY_ON if other.hv.powered_on else AFFINITY_OFF

    def _cpu_on(self, vm: ModelVm, target: int, entry: int, context_id: int) -> int:
        # The model's vCPUs have MPIDR affinity 0 = their id, the rest 0.
        other = vm.vcpus.get(target) if target < MAX_VCPUS else None
        if other is None:
            return PSCI_INVALID_PARAMETERS
        with self.model.lock:
            if other.hv.powered_on or other.hv.power_request is not None:
                return PSCI_ALREADY_ON
            other.hv.power_request = (entry, context_id)
        other.interrupt()
        self.model.notify()
        return PSCI_SUCCESS


#: The vCPU powered itself off (PSCI CPU_OFF).
_POWERED_OFF = HltExit()
