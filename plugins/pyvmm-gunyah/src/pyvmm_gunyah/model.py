"""A driver *model* of ``/dev/gunyah`` (ABI B): a stand-in for the Gunyah
hypervisor, not a backend.

pyvmm-gunyah's tests run on it, and so can a VMM developer without Gunyah
hardware: the model sits behind the plugin's OS seam
(``with GunyahModel().installed(): ...`` routes ``pyvmm_gunyah.host.HOST`` to it)
and answers every call as the Android Common Kernel's Gunyah driver does, with
the resource manager (RM) and the hypervisor folded in:

* the **driver** (``drivers/virt/gunyah/vm_mgr.c``, ``vm_mgr_mem.c``,
  ``gunyah_vcpu.c``, ``gunyah_irqfd.c``, ``gunyah_ioeventfd.c``): argument
  checks, errnos, object lifetimes, the vCPU run state machine, its ``run_lock``,
  the signal handling of ``GH_VCPU_RUN`` (an exit can come back with ``EINTR``),
  demand paging and the config-image parcel of lent memory;
* the **RM**: ``GH_VM_START``'s sequence reduced to what a VMM can observe --
  the config-image (DTB) parcel must lie in a memory binding; the RM reads the
  device tree there and creates the vCPUs (``/cpus`` nodes) and doorbells
  (``vdevice-type = "doorbell"`` nodes) it names, and the driver binds only
  those to the VMM's functions; the boot context is applied (auth NONE only);
  the VM's exit notifications carry the RM exit types;
* the **hypervisor**: the guest runs on pyvmm's software CPU; it sets the boot
  registers itself (PC from the boot context, else the start of the region
  holding the DTB; X0 = the DTB address; EL1h with DAIF masked), handles PSCI
  (SYSTEM_OFF, SYSTEM_RESET(2), CPU_ON/OFF, VERSION, FEATURES), owns the GIC --
  a GICv3 (:mod:`pyvmm.softcpu.gic`) at the addresses of the node the device
  tree's ``/gunyah-vm-config/interrupts`` ``config`` phandle names, its MMIO
  handled without an exit, doorbells raising their SPIs, the virtual timer its
  PPI -- and sleeps a vCPU in WFI until an interrupt for it or a signal.

Every constraint is a module-level :class:`~pyvmm.testing.driver_model.Rule`
citing ``docs/backends/gunyah.md`` (``§N.M``) and the driver file and function
it comes from.  The model reads the plugin's structs with its own ``struct``
formats (from §4) and imports nothing of the plugin but its host switch, so it
cannot agree with the plugin by construction.  Running guest code needs the
software CPU (``pip install 'pyvmm-core[softcpu]'``, which brings unicorn).

After a run, :attr:`GunyahModel.rejections` lists every rule the VMM broke
(``assert_no_rejections()`` fails on any).  Where the model does not know what
Gunyah would do it raises :class:`~pyvmm.testing.driver_model.ModelGap` instead
of inventing an answer: fault injection (resume_action FAULT), running a vCPU
again after a page-fault exit, a guest exception the software CPU cannot deliver,
CMA memory, authenticated VMs (QTVM, pVM firmware authentication), ballooning
after start, a device tree the RM would refuse, ABI C's guest_memfd.

Branches marked ``# behaviour:`` are flipped one at a time by
``tools/mutate_model.py``, which also removes each rule's ``raise``; the tests
must catch every such mutant.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pyvmm.arch.aarch64 import PC_ID, PSTATE_EL1H_DAIF, PSTATE_ID, SP_ID, core_reg_id, x_reg_id
from pyvmm.boot import Aarch64VcpuInit
from pyvmm.exits import ExitKind, HltExit, InternalErrorExit, MmioExit, SystemEvent, SystemEventExit, VcpuExit
from pyvmm.softcpu import Hypercall
from pyvmm.softcpu.gic import Gic
from pyvmm.testing.driver_model import (
    ERESTARTSYS,
    NO_SUCH_IOCTL,
    PAGE_SIZE,
    ConfigBlobError,
    DeviceFileModel,
    DeviceTreeBlob,
    FileObject,
    GuestCpu,
    ObjectMutex,
    Rule,
    RuleViolation,
    SharedPage,
    handles,
    parse_device_tree,
)

__all__ = ["GunyahModel"]

#: How often a sleeping vCPU looks at its doorbells' eventfds (seconds).
DOORBELL_POLL = 0.002
#: The most SPIs the GICv3 model has (INTIDs 32..1019).
GIC_MAX_SPIS = 988

#: SP_EL1's one-reg id: ``struct kvm_regs.sp_el1``, word offset 2*34.
SP_EL1_ID = core_reg_id(2 * 34)

#: The checkpoint a vCPU's run loop passes each time the ``vcpu_run`` hypercall
#: returns (for :meth:`GunyahModel.signal_at`: a signal arriving just then).
HYPERCALL_RETURNED = "gunyah:vcpu_run returned"
#: The checkpoint GH_VCPU_RUN passes once it holds the vCPU's run_lock, before its
#: checks (a signal arriving then meets the driver's ``out:`` path).
RUN_LOCK_TAKEN = "gunyah:run_lock taken"

_U64 = (1 << 64) - 1

# --- the interface, from docs/backends/gunyah.md §3.1/§4 ----------------------------
# Numbers are written out here rather than imported from the plugin's bindings, so
# a wrong binding cannot make the model agree with it.
GH_CREATE_VM = 0x00004700
GH_VM_SET_USER_MEM_REGION = 0x40204701
GH_VM_SET_DTB_CONFIG = 0x40104702
GH_VM_START = 0x00004703
GH_VM_ADD_FUNCTION = 0x40104704
GH_VCPU_RUN = 0x00004705
GH_VCPU_MMAP_SIZE = 0x00004706
GH_VM_REMOVE_FUNCTION = 0x40104707
GUNYAH_CREATE_GUEST_MEM = 0x40404708
GUNYAH_VM_MAP_MEM = 0x40204709
GH_VM_SET_BOOT_CONTEXT = 0x4010470A
GH_VM_ANDROID_LEND_USER_MEM = 0x40204111
GH_VM_ANDROID_SET_FW_CONFIG = 0x40104112
GH_VM_RECLAIM_REGION = 0x40104113
GH_VM_ANDROID_MAP_CMA_MEM = 0x40284115
GH_VM_ANDROID_SET_AUTH_TYPE = 0x40104116
GH_VM_CHECK_EXTENSION = 0x00004117

MEM_REGION = struct.Struct("<IIQQQ")  # label, flags, guest_phys_addr, memory_size, userspace_addr (32)
RANGE = struct.Struct("<QQ")  # dtb/firmware config, address range (16)
BOOT_CONTEXT = struct.Struct("<IIQ")  # reg, reserved, value (16)
FN_DESC = struct.Struct("<IIQ")  # type, arg_size, arg (16)
FN_VCPU = struct.Struct("<I")  # id (4)
FN_IRQFD = struct.Struct("<IIII")  # fd, label, flags, padding (16)
FN_IOEVENTFD = struct.Struct("<QQIiII")  # datamatch, addr, len, fd, flags, padding (32)
AUTH_DESC = struct.Struct("<IIQ")  # type, arg_size, arg (16)

# gh_vcpu_run offsets (§4.4)
RUN_IMMEDIATE_EXIT = 0
RUN_EXIT_REASON = 8
RUN_MMIO_PHYS = 16
RUN_MMIO_DATA = 24
RUN_MMIO_LEN = 32
RUN_MMIO_IS_WRITE = 36
RUN_MMIO_RESUME = 37
RUN_STATUS = 16
RUN_EXIT_INFO = 20  # type u16, padding u16, reason_size u32 @24, reason[8] @28
RUN_PF_ATTEMPT = 24
RUN_PF_RESUME = 28

MEM_R, MEM_W, MEM_X = 1, 2, 4
FN_VCPU_TYPE, FN_IRQFD_TYPE, FN_IOEVENTFD_TYPE = 1, 2, 3
FN_MAX_ARG_SIZE = 256
IRQFD_LEVEL = 1
IOEVENTFD_DATAMATCH = 1
REG_SET_X, REG_SET_PC, REG_SET_SP = 0, 1, 2
EXIT_MMIO, EXIT_STATUS, EXIT_PAGE_FAULT = 1, 2, 3
STATUS_LOAD_FAILED, STATUS_EXITED, STATUS_CRASHED = 1, 2, 3
RESUME_HANDLED, RESUME_FAULT, RESUME_RETRY = 0, 1, 2
RM_VM_EXIT, RM_PSCI_POWER_OFF, RM_PSCI_SYSTEM_RESET, RM_PSCI_SYSTEM_RESET2 = 0, 1, 2, 3
RM_WDT_BITE, RM_HYP_ERROR, RM_ASYNC_EXT_ABORT, RM_VM_FORCE_STOPPED = 4, 5, 6, 7
CAP_VCPU_TIMER_WAKEUP = 0
#: The one ``gunyah_auth_type`` of the uapi header (IMX): QTVM.
AUTH_TYPE_QCOM_TRUSTED_VM = 1
#: The RM authentication a firmware window switches the VM to (kernel-internal).
RM_AUTH_ANDROID_PVM = "qcom-android-pvm"

_S = "docs/backends/gunyah.md"

# --- rules ----------------------------------------------------------------------------
R_CREATE_ARG = Rule(
    "GH-CREATE-VM-ARG",
    errno.EINVAL,
    "GH_CREATE_VM's argument is reserved and must be 0",
    f"{_S} §3.1 GH_CREATE_VM, §9.3; vm_mgr.c gunyah_dev_ioctl_create_vm",
)
R_FOREIGN_MM = Rule(
    "GH-FOREIGN-MM",
    errno.EPERM,
    "SET_USER_MEM_REGION, LEND_USER_MEM, RECLAIM_REGION, MAP_CMA_MEM and VCPU_RUN only from the VM creator's mm",
    f"{_S} §3.2, §6.1, §9.3; vm_mgr.c gunyah_vm_ioctl, gunyah_vcpu.c gunyah_vcpu_run",
)
R_MEM_FLAGS = Rule(
    "GH-MEM-FLAGS",
    errno.EINVAL,
    "memory region flags other than R=1, W=2, X=4",
    f"{_S} §4.1 gh_userspace_memory_region; vm_mgr.c gunyah_vm_ioctl (GH_VM_SET_USER_MEM_REGION)",
)
R_MEM_ALIGN = Rule(
    "GH-MEM-ALIGN",
    errno.EINVAL,
    "a region's size must be non-zero and its size, guest and host addresses page-aligned",
    f"{_S} §4.1, §9.3; vm_mgr_mem.c gunyah_vm_binding_alloc",
)
R_MEM_WRAP = Rule(
    "GH-MEM-WRAP",
    errno.EINVAL,
    "the region runs past 2^64: its last page number wraps below its first and the range insert refuses it",
    f"{_S} §4.1; vm_mgr_mem.c gunyah_vm_binding_alloc (mtree_insert_range; the overflows_type test is dead)",
)
R_MEM_OVERLAP = Rule(
    "GH-MEM-OVERLAP",
    errno.EEXIST,
    "the guest range overlaps an existing memory binding",
    f"{_S} §4.1; vm_mgr_mem.c gunyah_vm_binding_alloc (mtree_insert_range)",
)
R_MEM_AFTER_START = Rule(
    "GH-MEM-AFTER-START",
    0,
    "memory given after START: the driver accepts it, the guest never learns of it",
    f"{_S} §5.1 step 2 ('all memory before start'); vm_mgr.c gunyah_vm_ioctl has no status check; vm-manager.rst",
)
R_BOOT_REG = Rule(
    "GH-BOOT-REG",
    errno.EINVAL,
    "boot context reg must be (set << 8 | index) with X index <= 31, PC index 0, SP index <= 2",
    f"{_S} §4.2 gh_vm_boot_context, §3.2; vm_mgr.c gunyah_vm_set_boot_context",
)
R_BOOT_AFTER_START = Rule(
    "GH-BOOT-AFTER-START",
    errno.EINVAL,
    "the boot context can be set only before START",
    f"{_S} §3.2, §8.1, §9.3; vm_mgr.c gunyah_vm_set_boot_context (vm_status != NO_STATE)",
)
R_FN_ARG_MAX = Rule(
    "GH-FN-ARG-MAX",
    errno.EINVAL,
    "gh_fn_desc.arg_size above 256",
    f"{_S} §4.3 gh_fn_desc; vm_mgr.c gunyah_vm_add_function_instance",
)
R_FN_ARG_SIZE = Rule(
    "GH-FN-ARG-SIZE",
    errno.EINVAL,
    "gh_fn_desc.arg_size must equal sizeof the function's argument struct",
    f"{_S} §4.3 gh_fn_desc, §9.3; gunyah_vcpu.c gunyah_vcpu_bind, gunyah_irqfd.c gunyah_irqfd_bind, "
    "gunyah_ioeventfd.c gunyah_ioeventfd_bind",
)
R_FN_TYPE = Rule(
    "GH-FN-TYPE",
    errno.ENOENT,
    "no VM function of this type (1 vCPU, 2 irqfd, 3 ioeventfd)",
    f"{_S} §4.3; vm_mgr.c gunyah_vm_get_function",
)
R_FN_TICKET = Rule(
    "GH-FN-TICKET",
    errno.EEXIST,
    "a vCPU id or doorbell label already has a function in this VM",
    f"{_S} §7.1; vm_mgr.c gunyah_vm_add_resource_ticket",
)
R_IRQFD_FLAGS = Rule(
    "GH-IRQFD-FLAGS",
    errno.EINVAL,
    "irqfd flags other than GH_IRQFD_LEVEL=1",
    f"{_S} §4.3 gh_fn_irqfd_arg, §7.1; gunyah_irqfd.c gunyah_irqfd_bind",
)
R_NOT_EVENTFD = Rule(
    "GH-NOT-EVENTFD",
    errno.EINVAL,
    "the fd of an irqfd or ioeventfd must be an eventfd",
    f"{_S} §7.1, §7.2; gunyah_irqfd.c gunyah_irqfd_bind, gunyah_ioeventfd.c gunyah_ioeventfd_bind (eventfd_ctx_fdget)",
)
R_EVENTFD_BADF = Rule(
    "GH-EVENTFD-BADF",
    errno.EBADF,
    "the fd of an irqfd or ioeventfd is not open",
    f"{_S} §7.1, §7.2; gunyah_irqfd.c gunyah_irqfd_bind, gunyah_ioeventfd.c gunyah_ioeventfd_bind (fdget)",
)
R_IOEVENTFD_FLAGS = Rule(
    "GH-IOEVENTFD-FLAGS",
    errno.EINVAL,
    "ioeventfd flags other than GH_IOEVENTFD_DATAMATCH=1 (crosvm's 1<<1 is refused)",
    f"{_S} §4.3 gh_fn_ioeventfd_arg, §7.2; gunyah_ioeventfd.c gunyah_ioeventfd_bind",
)
R_IOEVENTFD_LEN = Rule(
    "GH-IOEVENTFD-LEN",
    errno.EINVAL,
    "ioeventfd len must be 0, 1, 2, 4 or 8",
    f"{_S} §7.2 gh_fn_ioeventfd_arg; gunyah_ioeventfd.c gunyah_ioeventfd_bind",
)
R_IOEVENTFD_DATAMATCH_LEN = Rule(
    "GH-IOEVENTFD-DATAMATCH-LEN",
    errno.EINVAL,
    "DATAMATCH needs a length",
    f"{_S} §7.2 gh_fn_ioeventfd_arg; gunyah_ioeventfd.c gunyah_ioeventfd_bind",
)
R_IOEVENTFD_DUP = Rule(
    "GH-IOEVENTFD-DUP",
    errno.EEXIST,
    "an ioeventfd already sits in the same slot: same address and either without DATAMATCH, or same length and data",
    f"{_S} §7.2; vm_mgr.c gunyah_vm_add_io_handler (_gunyah_vm_io_handler_compare)",
)
R_REMOVE_NONE = Rule(
    "GH-REMOVE-NONE",
    errno.ENOENT,
    "GH_VM_REMOVE_FUNCTION matched no function",
    f"{_S} §4.3 GH_VM_REMOVE_FUNCTION; vm_mgr.c gunyah_vm_rm_function_instance",
)
R_START_DTB_SIZE = Rule(
    "GH-START-DTB-SIZE",
    errno.EINVAL,
    "START needs a DTB config of at least one page (the config-image parcel)",
    f"{_S} §5.2 steps 2-3; vm_mgr.c gunyah_generic_pre_vm_configure, vm_mgr_mem.c gunyah_gup_share_parcel",
)
R_START_DTB_MEMORY = Rule(
    "GH-START-DTB-MEMORY",
    errno.ENOENT,
    "START needs a memory binding at the DTB address",
    f"{_S} §5.2 steps 2-3; vm_mgr_mem.c gunyah_gup_share_parcel (mtree_load)",
)
R_START_FAILED = Rule(
    "GH-START-NOT-RUNNING",
    errno.ENODEV,
    "START of a VM whose earlier START failed: it is not RUNNING",
    f"{_S} §5.2 GH_VM_START; vm_mgr.c gunyah_vm_ensure_started",
)
R_RUN_UNBOUND = Rule(
    "GH-RUN-UNBOUND",
    errno.ENODEV,
    "RUN of a vCPU without a hypervisor resource: before START, or one the device tree did not name",
    f"{_S} §6.1, §9.3; gunyah_vcpu.c gunyah_vcpu_run (!vcpu->rsc), vm_mgr.c gunyah_vm_add_resource_ticket",
)
R_RUN_REMOVED = Rule(
    "GH-RUN-REMOVED",
    errno.ENODEV,
    "RUN of a vCPU whose function was removed",
    f"{_S} §5.3, §6.1; gunyah_vcpu.c gunyah_vcpu_run (!vcpu->f)",
)
R_RESUME_ACTION = Rule(
    "GH-RESUME-ACTION",
    errno.EINVAL,
    "after an MMIO exit, resume_action must be HANDLED (0) or FAULT (1)",
    f"{_S} §6.2; gunyah_vcpu.c gunyah_handle_mmio_resume",
)
R_RECLAIM_ALIGN = Rule(
    "GH-RECLAIM-ALIGN",
    errno.EINVAL,
    "RECLAIM_REGION range must be page-aligned",
    f"{_S} §3.2 GH_VM_RECLAIM_REGION; vm_mgr.c gunyah_vm_ioctl",
)
R_AUTH_TYPE = Rule(
    "GH-AUTH-TYPE",
    errno.ENOENT,
    "no authentication manager for this auth type (only QTVM, type 1, registers one)",
    f"{_S} §3.2; vm_mgr.c gunyah_get_auth_vm_mgr, gunyah_vm_set_auth_type",
)

# SMCCC/PSCI calls the hypervisor answers for the guest (function ids: Arm DEN0022,
# DEN0028).  What Gunyah implements is in quic/gunyah-hypervisor @ its mirror HEAD:
# ``hyp/vm/psci/psci.ev`` (the PSCI table; PSCI_FUNCTION32 entries exist only as
# SMC32 ids), ``hyp/vm/smccc/smccc.ev`` (SMCCC_VERSION) and
# ``hyp/vm/smccc/aarch64/src/smccc_64.c`` (anything no module handles reads -1).
PSCI_VERSION = 0x84000000
PSCI_CPU_OFF = 0x84000002
PSCI_CPU_ON_32, PSCI_CPU_ON_64 = 0x84000003, 0xC4000003
PSCI_SYSTEM_OFF = 0x84000008
PSCI_SYSTEM_RESET = 0x84000009
PSCI_SYSTEM_RESET2_32, PSCI_SYSTEM_RESET2_64 = 0x84000012, 0xC4000012
PSCI_FEATURES = 0x8400000A
SMCCC_VERSION_CALL, SMCCC_ARCH_FEATURES_CALL = 0x80000000, 0x80000001
PSCI_SUCCESS, PSCI_INVALID_PARAMETERS, PSCI_ALREADY_ON = 0, -2, -4
#: SMCCC_UNKNOWN_FUNCTION (``hyp/interfaces/smccc/smccc.tc``): the answer to a call
#: no module handles (``smccc_handle_vcpu_trap_default``) and PSCI_FEATURES' answer
#: for a function without an entry (``psci_features`` in ``psci_common.c``).
SMCCC_UNKNOWN_FUNCTION = -1
#: PSCI 1.1: ``PSCI_VER`` in ``hyp/vm/psci/psci.tc``, returned by ``psci_version``.
PSCI_VERSION_1_1 = 0x00010001
#: SMCCC 1.3: ``SMCCC_VERSION`` in ``hyp/interfaces/smccc/smccc.tc`` (``smccc_version``).
SMCCC_VERSION_1_3 = 0x00010003
#: PSCI functions (the low 16 bits of the id) Gunyah implements, from psci.ev:
#: SMC32-only ones, ones in both conventions, and the subset this model answers.
_PSCI_SMC32_ONLY = {0x0: "PSCI_VERSION", 0x2: "CPU_OFF", 0x8: "SYSTEM_OFF", 0x9: "SYSTEM_RESET", 0xA: "PSCI_FEATURES"}
_PSCI_BOTH = {
    0x1: "CPU_SUSPEND",
    0x3: "CPU_ON",
    0x4: "AFFINITY_INFO",
    0xC: "CPU_DEFAULT_SUSPEND",
    0x12: "SYSTEM_RESET2",
}
_PSCI_MODELLED = {0x0, 0x2, 0x3, 0x8, 0x9, 0xA, 0x12}
_SMCCC_FAST = 1 << 31
_SMCCC_64 = 1 << 30
_SMCCC_RES0 = 0xFF << 16


def _smccc_owner(function: int) -> int:
    return (function >> 24) & 0x3F


_OWNER_ARCH, _OWNER_STANDARD, _OWNER_STANDARD_HYP, _OWNER_VENDOR_HYP = 0, 4, 5, 6


class VmStatus:
    """The RM's VM states the driver tracks (``gunyah_rm_vm_status``), reduced."""

    NO_STATE = "no-state"
    LOAD = "load"  # START began and failed before RM vm_init
    INIT_FAILED = "init-failed"
    RUNNING = "running"
    EXITED = "exited"
    CRASHED = "crashed"


@dataclass
class Binding:
    label: int
    flags: int
    gpa: int
    size: int
    host_addr: int
    lent: bool

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def host_page(self, gpa: int) -> int:
        """The host address of the page holding guest address ``gpa``."""
        return self.host_addr + (gpa - self.gpa) // PAGE_SIZE * PAGE_SIZE


@dataclass
class Function:
    """A VM function instance: its type and the argument bytes it was added with."""

    type: int
    arg: bytes
    target: object = None  # the vCPU file, or None


@dataclass
class IoHandler:
    """An ioeventfd as the driver keeps it: without DATAMATCH, length and data are
    not stored (0), and it matches any write at its address."""

    addr: int
    length: int
    datamatch: bool
    data: int
    fd: int
    function: Function

    def clashes(self, other: IoHandler) -> bool:
        """``_gunyah_vm_io_handler_compare`` == 0: the same slot in the tree."""
        if self.addr != other.addr:
            return False
        if bool(self.length) != bool(other.length):  # behaviour: io-compare-any-length
            return True
        if self.length != other.length:
            return False
        if self.datamatch != other.datamatch:  # behaviour: io-compare-mixed-datamatch
            return True
        return self.data == other.data

    def matches(self, addr: int, length: int, value: int) -> bool:
        """``gunyah_vm_mgr_find_io_hdlr`` for a guest write."""
        if addr != self.addr:
            return False
        if not self.length:  # behaviour: io-match-any-length
            return True
        return self.length == length and self.data == value


@dataclass
class ExitInfo:
    type: int = 0
    reason: bytes = b""


@dataclass
class Doorbell:
    label: int
    fd: int
    level: bool
    bound: bool = False
    rung: int = 0
    dropped: int = 0


@dataclass
class ModelStats:
    """What the model saw the guest do, for tests to assert on."""

    psci_calls: list[int] = field(default_factory=list)
    ioevents_signalled: int = 0
    hypercalls: int = 0
    demand_pages: int = 0


@dataclass(frozen=True)
class RmConfig:
    """What the RM took from the VM's device tree (RM ``vm_config_parser.c``
    ``parse_vcpus``, ``parse_doorbell``): the vCPUs, labelled by their position
    under the ``config`` node (``/cpus``; proxy affinity), the one enabled at boot,
    and the doorbell labels."""

    vcpus: tuple[int, ...]
    boot_vcpu: int
    doorbells: frozenset[int]
    #: Each doorbell's INTID, from its node's ``interrupts`` (``<0 spi type>``).
    doorbell_intids: tuple[tuple[int, int], ...] = ()
    #: The GIC the ``interrupts`` node's ``config`` phandle names: distributor
    #: and redistributor base addresses; None when the tree names none.
    gic: tuple[int, int] | None = None


class Outcome(enum.Enum):
    """What one ``vcpu_run`` hypercall leaves the driver's run loop with."""

    AGAIN = "again"  # the hypervisor handled it (ioeventfd, PSCI, demand paging, preemption): loop
    TO_USER = "to-user"  # an exit for the VMM is in the run page
    SLEEP = "sleep"  # WFI or powered off: wait for an interrupt
    SYSTEM = "system"  # the VM stopped running


@dataclass
class Resume:
    """The resume data the driver passes to the next ``vcpu_run`` hypercall."""

    action: int
    data: bytes = b""


@dataclass
class HvVcpu:
    """The hypervisor's vCPU (the RM's, one per ``/cpus`` node): it outlives the
    driver's vCPU function that happens to be bound to it."""

    label: int
    powered_on: bool = False
    power_request: tuple[int, int] | None = None
    boot_registers: dict[int, int] | None = None
    cpu: GuestCpu | None = None
    #: A wake-up without an interrupt: PSCI CPU_ON (the GIC's interrupts wake
    #: it through ``cpu``).
    wake_pending: bool = False
    #: It executed WFI and waits for an interrupt.
    waiting: bool = False
    faulted_at: int | None = None
    crash_reason: str = ""


class GunyahModel(DeviceFileModel):
    """The model of one host's ``/dev/gunyah``.

    :param abi: which interface to speak: ``"B"`` (what pyvmm-gunyah needs), or
        ``"A"``/``"C"`` to test the plugin's refusal.
    :param check_extension: whether ``GH_VM_CHECK_EXTENSION`` exists (the
        Qualcomm B kernels have it, the ACK android15 one does not).
    :param timer_wakeup: its answer for ``GH_CAP_VCPU_TIMER_WAKEUP``.
    """

    def __init__(self, abi: str = "B", *, check_extension: bool = True, timer_wakeup: bool = True) -> None:
        super().__init__()
        if abi not in ("A", "B", "C"):
            raise ValueError(f"abi must be 'A', 'B' or 'C', not {abi!r}")
        self.abi = abi
        self.check_extension = check_extension
        self.timer_wakeup = timer_wakeup
        self.devices["/dev/gunyah"] = DeviceFile
        self.vms: list[ModelVm] = []
        self.stats = ModelStats()
        self.hypervisor = Hypervisor(self)
        #: Host pages (page-aligned host addresses) of lent memory the guest owns
        #: now: the host has lost access to them.
        self.host_lost: set[int] = set()

    def host_may_access(self, host_addr: int, size: int = 1) -> bool:
        """False if any of ``size`` bytes at ``host_addr`` lie in a lent page the
        driver has donated to the guest (config parcel at START, or first touch)."""
        first = host_addr // PAGE_SIZE * PAGE_SIZE
        return not any(page in self.host_lost for page in range(first, host_addr + size, PAGE_SIZE))

    def absent(self, request: int) -> bool:
        """Whether this model's ABI lacks ``request`` (its VM ioctl switch has no case)."""
        if self.abi == "A":
            return request in (GH_VM_SET_BOOT_CONTEXT, GH_VM_RECLAIM_REGION, GH_VM_ANDROID_MAP_CMA_MEM,
                               GH_VM_ANDROID_SET_AUTH_TYPE, GH_VM_CHECK_EXTENSION)  # fmt: skip
        if self.abi == "C":
            return request in (GH_VM_SET_USER_MEM_REGION, GH_VM_ANDROID_LEND_USER_MEM, GH_VM_CHECK_EXTENSION)
        return request == GH_VM_CHECK_EXTENSION and not self.check_extension

    def on_signal(self, thread_id: int) -> None:
        # A sleeping vCPU sees the signal through sleep_until; one in the guest
        # needs the host interrupt that makes the hypervisor return.
        for vm in list(self.vms):
            for vcpu in list(vm.vcpus.values()):
                hv = vcpu.hv
                if vcpu.running_on == thread_id and hv is not None and hv.cpu is not None:
                    hv.cpu.kick()

    # --- events from outside the VMM (RM notifications) ---------------------------------
    def rm_exit(self, vm: ModelVm, exit_type: int, reason: bytes = b"") -> None:
        """The RM reports that ``vm`` exited (watchdog bite, forced stop, ...)."""
        vm.exit(exit_type, reason)

    def rm_status(self, vm: ModelVm, status: str) -> None:
        """The RM reports ``vm`` in ``status`` (e.g. :attr:`VmStatus.INIT_FAILED`)."""
        with self.lock:
            vm.status = status
        vm.wake_all()

    @contextmanager
    def installed(self) -> Iterator[GunyahModel]:
        """Install the model as pyvmm-gunyah's seam for the block: VMs created
        inside talk to it instead of ``/dev/gunyah``."""
        from pyvmm_gunyah.host import HOST

        with HOST.use(self):
            yield self


class DeviceFile(FileObject):
    """An open ``/dev/gunyah``."""

    kind = "gunyah"
    model: GunyahModel

    @handles(GH_CREATE_VM, "GH_CREATE_VM")
    def create_vm(self, arg: int) -> int:
        if arg != 0:
            raise RuleViolation(R_CREATE_ARG, f"arg {arg:#x}")
        vm = ModelVm(self.model)
        self.model.vms.append(vm)
        return self.model.install(vm)

    @handles(GUNYAH_CREATE_GUEST_MEM, "GUNYAH_CREATE_GUEST_MEM")
    def create_guest_mem(self, arg: int) -> int:
        if self.model.abi != "C":
            raise RuleViolation(NO_SUCH_IOCTL, "GUNYAH_CREATE_GUEST_MEM is ABI C only")
        raise self.model.not_modelled("guest_memfd (ABI C)")


class ModelVm(FileObject):
    """A VM fd: the driver's ``struct gunyah_vm`` plus the RM's view of the VM."""

    kind = "gunyah-vm"
    model: GunyahModel

    def __init__(self, model: GunyahModel) -> None:
        super().__init__(model)
        self.status = VmStatus.NO_STATE
        self.bindings: list[Binding] = []
        self.dtb: tuple[int, int] | None = None
        self.firmware: tuple[int, int] | None = None
        self.auth: str | None = None  # None = GUNYAH_RM_VM_AUTH_NONE
        self.boot_context: dict[int, int] = {}
        self.functions: list[Function] = []
        self.vcpus: dict[int, ModelVcpu] = {}
        self.doorbells: dict[int, Doorbell] = {}
        self.io_handlers: list[IoHandler] = []
        self.exit_info = ExitInfo()
        #: What the RM read from the device tree at START.
        self.config: RmConfig | None = None
        #: The hypervisor's vCPUs, by resource label (created at START).
        self.hv_vcpus: dict[int, HvVcpu] = {}
        #: Guest pages of lent bindings the guest owns (donated by the driver).
        self.provided: set[int] = set()
        #: The hypervisor's GIC (made at START when the device tree names one).
        self.gic: Gic | None = None
        self.refs = 1

    def dispatch(self, request: int, arg: int) -> int:
        if self.model.absent(request):
            raise RuleViolation(NO_SUCH_IOCTL, f"ABI {self.model.abi} has no {self.ioctl_name(request)}")
        return super().dispatch(request, arg)

    def _check_owner(self) -> None:
        if self.model.caller != self.owner:
            raise RuleViolation(R_FOREIGN_MM, f"caller {self.model.caller}, VM created by {self.owner}")

    # --- memory -----------------------------------------------------------------
    @handles(GH_VM_SET_USER_MEM_REGION, "GH_VM_SET_USER_MEM_REGION")
    def set_user_mem_region(self, arg: int) -> int:
        return self._add_binding(arg, lend=False)

    @handles(GH_VM_ANDROID_LEND_USER_MEM, "GH_VM_ANDROID_LEND_USER_MEM")
    def lend_user_mem(self, arg: int) -> int:
        return self._add_binding(arg, lend=True)

    def _add_binding(self, arg: int, *, lend: bool) -> int:
        """``gunyah_vm_binding_alloc``: a binding only; no page is pinned, shared or
        lent before START (§8.2)."""
        self._check_owner()
        label, flags, gpa, size, host_addr = MEM_REGION.unpack(self.model.copy_from_user(arg, MEM_REGION.size))
        if flags & ~(MEM_R | MEM_W | MEM_X):
            raise RuleViolation(R_MEM_FLAGS, f"flags {flags:#x}")
        if not size or size % PAGE_SIZE or host_addr % PAGE_SIZE or gpa % PAGE_SIZE:
            raise RuleViolation(R_MEM_ALIGN, f"gpa {gpa:#x} size {size:#x} host {host_addr:#x}")
        # The range insert takes page numbers of the first and last byte, the last
        # computed in u64: it wraps only for a region running *past* 2^64.
        if (gpa + size - 1) & _U64 < gpa:
            raise RuleViolation(R_MEM_WRAP, f"{gpa:#x}+{size:#x}")
        with self.model.lock:
            for other in self.bindings:
                if gpa < other.end and other.gpa < gpa + size:
                    raise RuleViolation(R_MEM_OVERLAP, f"{gpa:#x}+{size:#x} overlaps label {other.label}")
            # B keeps the label unchecked (§4.1): two regions may share one.
            self.bindings.append(Binding(label, flags, gpa, size, host_addr, lend))
        if self.status != VmStatus.NO_STATE:
            self.model.advise(R_MEM_AFTER_START, f"label {label} at {gpa:#x} after START")
        return 0

    def binding_at(self, gpa: int) -> Binding | None:
        for binding in self.bindings:
            if binding.gpa <= gpa < binding.end:
                return binding
        return None

    def provide(self, binding: Binding, gpa: int) -> bool:
        """``gunyah_vm_provide_folio`` of the page at ``gpa``: a lent page is
        donated to the guest and the host loses it.  False if it already was
        (the driver's -EAGAIN: retry)."""
        page = gpa // PAGE_SIZE * PAGE_SIZE
        with self.model.lock:
            if page in self.provided:
                return False
            self.provided.add(page)
            if binding.lent:  # behaviour: lent-page-lost-on-donation
                self.model.host_lost.add(binding.host_page(gpa))
        return True

    @handles(GH_VM_RECLAIM_REGION, "GH_VM_RECLAIM_REGION")
    def reclaim_region(self, arg: int) -> int:
        self._check_owner()
        gpa, size = RANGE.unpack(self.model.copy_from_user(arg, RANGE.size))
        if gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise RuleViolation(R_RECLAIM_ALIGN, f"{gpa:#x}+{size:#x}")
        if self.status != VmStatus.NO_STATE:
            raise self.model.not_modelled("reclaiming (ballooning) memory of a started VM")
        return 0

    @handles(GH_VM_ANDROID_MAP_CMA_MEM, "GH_VM_ANDROID_MAP_CMA_MEM")
    def map_cma_mem(self, arg: int) -> int:
        self._check_owner()
        raise self.model.not_modelled("CMA memory (GH_VM_ANDROID_MAP_CMA_MEM)")

    @handles(GUNYAH_VM_MAP_MEM, "GUNYAH_VM_MAP_MEM")
    def map_mem(self, arg: int) -> int:
        if self.model.abi != "C":
            raise RuleViolation(NO_SUCH_IOCTL, "GUNYAH_VM_MAP_MEM is ABI C only")
        raise self.model.not_modelled("guest_memfd mapping (ABI C)")

    # --- configuration ----------------------------------------------------------
    @handles(GH_VM_SET_DTB_CONFIG, "GH_VM_SET_DTB_CONFIG")
    def set_dtb_config(self, arg: int) -> int:
        # The driver's overflows_type() test sees an already wrapped u64: a
        # wrapping range is stored (§3.2).
        self.dtb = RANGE.unpack(self.model.copy_from_user(arg, RANGE.size))
        return 0

    @handles(GH_VM_ANDROID_SET_FW_CONFIG, "GH_VM_ANDROID_SET_FW_CONFIG")
    def set_fw_config(self, arg: int) -> int:
        self.firmware = RANGE.unpack(self.model.copy_from_user(arg, RANGE.size))
        if self.auth is None:  # LA switches only a VM still without authentication (§2.2)
            self.auth = RM_AUTH_ANDROID_PVM
        return 0

    @handles(GH_VM_ANDROID_SET_AUTH_TYPE, "GH_VM_ANDROID_SET_AUTH_TYPE")
    def set_auth_type(self, arg: int) -> int:
        auth_type, _, _ = AUTH_DESC.unpack(self.model.copy_from_user(arg, AUTH_DESC.size))
        if auth_type != AUTH_TYPE_QCOM_TRUSTED_VM:
            raise RuleViolation(R_AUTH_TYPE, f"type {auth_type}")
        raise self.model.not_modelled("authenticated VMs (GH_VM_ANDROID_SET_AUTH_TYPE, QTVM)")

    @handles(GH_VM_SET_BOOT_CONTEXT, "GH_VM_SET_BOOT_CONTEXT")
    def set_boot_context(self, arg: int) -> int:
        reg, _, value = BOOT_CONTEXT.unpack(self.model.copy_from_user(arg, BOOT_CONTEXT.size))
        reg_set, index = reg >> 8 & 0xFF, reg & 0xFF
        valid = reg & ~0xFFFF == 0 and (
            (reg_set == REG_SET_X and index <= 31)
            or (reg_set == REG_SET_PC and index == 0)
            or (reg_set == REG_SET_SP and index <= 2)
        )
        if not valid:
            raise RuleViolation(R_BOOT_REG, f"reg {reg:#x}")
        if self.status != VmStatus.NO_STATE:
            raise RuleViolation(R_BOOT_AFTER_START, f"VM is {self.status}")
        self.boot_context[reg] = value
        return 0

    @handles(GH_VM_CHECK_EXTENSION, "GH_VM_CHECK_EXTENSION")
    def check_extension(self, arg: int) -> int:
        return int(arg == CAP_VCPU_TIMER_WAKEUP and self.model.timer_wakeup)

    # --- functions --------------------------------------------------------------
    def _read_desc(self, arg: int) -> tuple[int, int, bytes]:
        fn_type, arg_size, arg_ptr = FN_DESC.unpack(self.model.copy_from_user(arg, FN_DESC.size))
        data = self.model.copy_from_user(arg_ptr, arg_size) if arg_size else b""
        return fn_type, arg_size, data

    @handles(GH_VM_ADD_FUNCTION, "GH_VM_ADD_FUNCTION")
    def add_function(self, arg: int) -> int:
        fn_type, arg_size, _ = FN_DESC.unpack(self.model.copy_from_user(arg, FN_DESC.size))
        if arg_size > FN_MAX_ARG_SIZE:
            raise RuleViolation(R_FN_ARG_MAX, f"arg_size {arg_size}")
        fn_type, arg_size, data = self._read_desc(arg)
        expected = {FN_VCPU_TYPE: FN_VCPU.size, FN_IRQFD_TYPE: FN_IRQFD.size, FN_IOEVENTFD_TYPE: FN_IOEVENTFD.size}
        if fn_type not in expected:
            raise RuleViolation(R_FN_TYPE, f"type {fn_type}")
        if arg_size != expected[fn_type]:
            raise RuleViolation(R_FN_ARG_SIZE, f"type {fn_type}: arg_size {arg_size}, expected {expected[fn_type]}")
        function = Function(fn_type, data)
        with self.model.lock:
            if fn_type == FN_VCPU_TYPE:
                result = self._bind_vcpu(function)
            elif fn_type == FN_IRQFD_TYPE:
                result = self._bind_irqfd(function)
            else:
                result = self._bind_ioeventfd(function)
            self.functions.append(function)
        return result

    def _bind_vcpu(self, function: Function) -> int:
        """``gunyah_vcpu_bind``: a resource ticket for the id; a resource the RM
        already handed over (after START) is populated at once."""
        (vcpu_id,) = FN_VCPU.unpack(function.arg)
        if vcpu_id in self.vcpus:
            raise RuleViolation(R_FN_TICKET, f"vCPU {vcpu_id}")
        vcpu = ModelVcpu(self, vcpu_id)
        self.refs += 1
        function.target = vcpu
        self.vcpus[vcpu_id] = vcpu
        vcpu.hv = self.hv_vcpus.get(vcpu_id)  # behaviour: vcpu-bound-after-start
        return self.model.install(vcpu)

    def _check_eventfd(self, fd: int) -> None:
        if not _fd_open(fd):
            raise RuleViolation(R_EVENTFD_BADF, f"fd {fd}")
        if not self.model.is_eventfd(fd):
            raise RuleViolation(R_NOT_EVENTFD, f"fd {fd}")

    def _bind_irqfd(self, function: Function) -> int:
        fd, label, flags, _ = FN_IRQFD.unpack(function.arg)
        if flags & ~IRQFD_LEVEL:
            raise RuleViolation(R_IRQFD_FLAGS, f"flags {flags:#x}")
        self._check_eventfd(fd)
        if label in self.doorbells:
            raise RuleViolation(R_FN_TICKET, f"doorbell {label}")
        bell = Doorbell(label, fd, bool(flags & IRQFD_LEVEL))
        # The ticket finds a BELL_TX resource only if the RM made one: after START,
        # for a label the device tree named.
        if self.config is not None and label in self.config.doorbells:  # behaviour: doorbell-bound-after-start
            bell.bound = True
        self.doorbells[label] = bell
        return 0

    def _bind_ioeventfd(self, function: Function) -> int:
        datamatch, addr, length, fd, flags, _ = FN_IOEVENTFD.unpack(function.arg)
        if flags & ~IOEVENTFD_DATAMATCH:
            raise RuleViolation(R_IOEVENTFD_FLAGS, f"flags {flags:#x}")
        if length not in (0, 1, 2, 4, 8):
            raise RuleViolation(R_IOEVENTFD_LEN, f"len {length}")
        # The range-wrap test (overflows_type on a wrapped u64) never fires: addr+len
        # past 2^64 is accepted (§7.2).
        if not length and flags & IOEVENTFD_DATAMATCH:
            raise RuleViolation(R_IOEVENTFD_DATAMATCH_LEN, f"addr {addr:#x}")
        self._check_eventfd(fd)
        # Without DATAMATCH the driver stores neither length nor data (both 0).
        if flags & IOEVENTFD_DATAMATCH:  # behaviour: ioeventfd-stores-datamatch-only
            handler = IoHandler(addr, length, True, datamatch, fd, function)
        else:
            handler = IoHandler(addr, 0, False, 0, fd, function)
        if any(handler.clashes(other) for other in self.io_handlers):
            raise RuleViolation(R_IOEVENTFD_DUP, f"addr {addr:#x} len {length}")
        self.io_handlers.append(handler)
        return 0

    @handles(GH_VM_REMOVE_FUNCTION, "GH_VM_REMOVE_FUNCTION")
    def remove_function(self, arg: int) -> int:
        fn_type, arg_size, data = self._read_desc(arg)
        with self.model.lock:
            removed = [f for f in self.functions if f.type == fn_type and self._same_function(f, data, arg_size)]
            for function in removed:
                self.functions.remove(function)
        if not removed:
            raise RuleViolation(R_REMOVE_NONE, f"type {fn_type}")
        for function in removed:
            self._unbind(function)
        return 0

    @staticmethod
    def _same_function(function: Function, data: bytes, size: int) -> bool:
        """The function type's ``compare()``: vCPU by id, irqfd by label, ioeventfd
        by address, length, flags and (with DATAMATCH) data."""
        if size != len(function.arg):
            return False
        if function.type == FN_VCPU_TYPE:
            return bool(FN_VCPU.unpack(function.arg)[0] == FN_VCPU.unpack(data)[0])
        if function.type == FN_IRQFD_TYPE:
            return bool(FN_IRQFD.unpack(function.arg)[1] == FN_IRQFD.unpack(data)[1])
        mine, theirs = FN_IOEVENTFD.unpack(function.arg), FN_IOEVENTFD.unpack(data)
        if (mine[1], mine[2], mine[4]) != (theirs[1], theirs[2], theirs[4]):
            return False
        return not mine[4] & IOEVENTFD_DATAMATCH or mine[0] == theirs[0]

    def _unbind(self, function: Function) -> None:
        if function.type == FN_VCPU_TYPE:
            vcpu = function.target
            assert isinstance(vcpu, ModelVcpu)
            vcpu.unbind()
            with self.model.lock:
                del self.vcpus[vcpu.id]
        elif function.type == FN_IRQFD_TYPE:
            with self.model.lock:
                del self.doorbells[FN_IRQFD.unpack(function.arg)[1]]
        else:
            with self.model.lock:
                self.io_handlers = [h for h in self.io_handlers if h.function is not function]

    # --- start ------------------------------------------------------------------
    @handles(GH_VM_START, "GH_VM_START")
    def start(self, arg: int) -> int:
        with self.model.lock:
            if self.status == VmStatus.NO_STATE:
                self._start()
            if self.status != VmStatus.RUNNING:
                raise RuleViolation(R_START_FAILED, f"VM is {self.status}")
        return 0

    def _start(self) -> None:
        """``gunyah_vm_start``, reduced to what a VMM can observe (§5.2)."""
        gpa, size = self.dtb or (0, 0)
        if self.firmware is not None and self.binding_at(self.firmware[0]) is None:
            raise self.model.not_modelled("firmware outside guest memory")
        self.status = VmStatus.LOAD
        # The config-image parcel: whole pages from the one holding the DTB.
        first, pages = gpa // PAGE_SIZE * PAGE_SIZE, size // PAGE_SIZE
        if not pages:
            raise RuleViolation(R_START_DTB_SIZE, f"DTB size {size:#x}")
        binding = self.binding_at(first)
        if binding is None:
            raise RuleViolation(R_START_DTB_MEMORY, f"no binding at DTB {gpa:#x}")
        if first + pages * PAGE_SIZE > binding.end:
            raise self.model.not_modelled(
                "a config-image parcel running past its memory binding (the driver pins whatever host pages follow)"
            )
        # The parcel is shared with the VM -- lent, for a lent binding: the host
        # loses those pages now (gunyah_gup_share_parcel, gunyah_vm_parcel_to_paged).
        for page in range(first, first + pages * PAGE_SIZE, PAGE_SIZE):
            self.provide(binding, page)  # behaviour: parcel-lent-at-start
        # RM vm_configure/vm_init: the RM reads the device tree from the parcel.
        readable = min(size, binding.end - gpa)
        blob = self.model.copy_from_user(binding.host_addr + (gpa - binding.gpa), readable)
        try:
            tree = self.model.read_config("device tree", gpa, blob, parse_device_tree)
        except ConfigBlobError as exc:
            raise self.model.not_modelled(f"the RM's answer to a DTB it cannot parse ({exc})") from None
        assert isinstance(tree, DeviceTreeBlob)
        config = rm_config(self.model, tree)
        # The hypervisor resources the RM made, handed to the tickets with the same
        # type and label (gunyah_vm_add_resource): only what the tree named.
        self.config = config
        self.hv_vcpus = {label: HvVcpu(label) for label in config.vcpus}
        if config.gic is not None:
            # The hypervisor's vGIC, where the tree the RM read puts it; the
            # redistributors follow the vCPUs' labels (MPIDR affinity 0).
            spis = max([32, *(intid - 32 + 1 for _, intid in config.doorbell_intids)])
            self.gic = Gic(
                len(config.vcpus),
                spis=(spis + 31) // 32 * 32,
                distributor_base=config.gic[0],
                redistributor_base=config.gic[1],
            )
        for vcpu in self.vcpus.values():
            vcpu.hv = self.hv_vcpus.get(vcpu.id)  # behaviour: vcpu-bound-at-start
        for bell in self.doorbells.values():
            # Writes so far found no resource: "Premature injection", dropped.
            bell.dropped += self.model.drain_eventfd(bell.fd)  # behaviour: premature-injection-dropped
            bell.bound = bell.label in config.doorbells  # behaviour: doorbell-bound-at-start
        boot = self.hv_vcpus[config.boot_vcpu]
        boot.powered_on = True
        boot.boot_registers = self.model.hypervisor.boot_registers(self, self._entry(binding), gpa)
        self.status = VmStatus.RUNNING

    def _entry(self, dtb_binding: Binding) -> int:
        """Where the boot vCPU starts: the firmware for a pVM (auth set: the boot
        context is not applied), else the boot context's PC, else the start of the
        payload region, which crosvm shares with the DTB (§5.1 steps 6-7, §8.1)."""
        if self.auth is not None and self.firmware is not None:
            return self.firmware[0]
        return self.boot_context.get(REG_SET_PC << 8, dtb_binding.gpa)

    def applied_boot_context(self) -> dict[int, int]:
        """The boot context the RM applied at start (auth NONE only, §5.2 step 7;
        vm_mgr.c gunyah_generic_pre_vm_start)."""
        if self.auth is not None:  # behaviour: boot-context-auth-none-only
            return {}
        return dict(self.boot_context)

    # --- VM exit ----------------------------------------------------------------
    def exit(self, exit_type: int, reason: bytes = b"") -> None:
        """The RM's "VM exited" notification."""
        with self.model.lock:
            if self.status == VmStatus.RUNNING:
                self.status = VmStatus.EXITED
                self.exit_info = ExitInfo(exit_type, reason[:8])
        self.wake_all()

    def wake_all(self) -> None:
        for vcpu in list(self.vcpus.values()):
            vcpu.interrupt()
        self.model.notify()

    # --- doorbells and ioeventfds -------------------------------------------------
    def poll_doorbells(self) -> bool:
        """Deliver doorbell writes since the last poll; True if any rang."""
        rang: list[int] = []
        for bell in list(self.doorbells.values()):
            count = self.model.drain_eventfd(bell.fd)
            if not count:
                continue
            if bell.bound:  # behaviour: doorbell-needs-resource
                bell.rung += count
                rang.append(bell.label)
            else:
                bell.dropped += count
        if rang:  # behaviour: doorbell-wakes-vcpus
            self._raise_doorbells(rang)
        return bool(rang)

    def _raise_doorbells(self, labels: list[int]) -> None:
        """A rung doorbell asserts its interrupt: the SPI its device-tree node
        names (``interrupts = <0 spi type>``, §7.3; the bell's masks set for
        LEVEL at bind, §7.1) at the GIC, routed as the guest programmed
        ``GICD_IROUTER``; the vCPU it targets is kicked to take it.

        A VM always has Gunyah's vGIC: the RM places it by platform
        (``platform/<soc>`` in the RM), not by the VM's tree, and the model only
        knows it from the tree's ``interrupts { config }``.  Without one there,
        what the SPI does is unknown (enabled or not, routed where): ``ModelGap``."""
        gic, config = self.gic, self.config
        if gic is None or config is None:
            raise self.model.not_modelled(
                "a doorbell rung in a VM whose device tree names no GIC (where the RM put the vGIC "
                "and how the guest programmed the doorbell's SPI)"
            )
        intids = dict(config.doorbell_intids)
        targets = {gic.set_spi(intids[label]) for label in labels}
        for vcpu in list(self.vcpus.values()):
            bound = vcpu.hv
            if bound is not None and bound.label in targets and vcpu.running_on not in (None, threading.get_ident()):
                vcpu.interrupt()
        self.model.notify()

    def mmio_write_handled(self, addr: int, length: int, value: int) -> bool:
        """``gunyah_vm_mmio_write``: the ioeventfd lookup for a guest MMIO write."""
        for handler in self.io_handlers:
            if handler.matches(addr, length, value):
                self.model.signal_eventfd(handler.fd)
                self.model.stats.ioevents_signalled += 1
                return True
        return False

    # --- lifetime -------------------------------------------------------------------
    def release(self) -> None:
        self.put()

    def put(self) -> None:
        """Drop a reference (the VM fd holds one, each vCPU fd another:
        ``gunyah_vm_get`` in ``gunyah_vcpu_bind``).  The last one tears the VM
        down (``_gunyah_vm_put``): functions go, lent memory comes back."""
        with self.model.lock:
            self.refs -= 1
            if self.refs:
                return
            for binding in self.bindings:
                if binding.lent:
                    for page in range(binding.host_addr, binding.host_addr + binding.size, PAGE_SIZE):
                        self.model.host_lost.discard(page)
            self.provided.clear()
            vcpus = list(self.vcpus.values())
            if self in self.model.vms:
                self.model.vms.remove(self)
        for vcpu in vcpus:
            vcpu.unbind()
        for hv in self.hv_vcpus.values():
            if hv.cpu is not None:
                hv.cpu.close()
                hv.cpu = None


def rm_config(model: GunyahModel, tree: DeviceTreeBlob) -> RmConfig:
    """What the RM makes of the VM's device tree (RM ``vm_config_parser.c``
    ``parse_vcpus`` and ``parse_doorbell``, ``vm_config.c`` ``handle_vcpu`` and
    ``vm_config_get_resource_descs``; docs/backends/gunyah.md §7.3).  A tree the
    RM refuses raises :class:`ModelGap`: its error as the driver reports it is
    not modelled."""
    root = next((p for p in ("/gunyah-vm-config", "/qcom,vm-config") if tree.has(p)), None)
    if root is None:
        raise model.not_modelled("the RM's answer to a device tree without /gunyah-vm-config")
    vcpus_node = f"{root}/vcpus"
    if not tree.has(vcpus_node):
        raise model.not_modelled(f"the RM's answer to a device tree without {vcpus_node} (no vCPU at all)")
    cpus = tree.string(vcpus_node, "config") or "/cpus"
    if not tree.has(cpus):
        raise model.not_modelled(f"the RM's answer to a vcpus config path {cpus!r} that does not exist")
    default_method = tree.string(cpus, "enable-method")
    labels: list[int] = []
    boot: list[int] = []
    for node in tree.children(cpus):
        if tree.string(node, "device_type") != "cpu":
            continue
        status = tree.string(node, "status")
        if status is not None and status.startswith("fail"):
            continue
        if status is None:
            # The RM takes the first CPU without a status as the boot CPU.
            enabled = not boot
        elif status in ("okay", "disabled"):
            enabled = status == "okay"
        else:
            raise model.not_modelled(f"the RM's answer to cpu status {status!r}")
        if not enabled and not (tree.string(node, "enable-method") or default_method):
            raise model.not_modelled(f"the RM's answer to secondary vCPU {node} without an enable-method")
        # Proxy affinity: the vCPU resource's label is its position (handle_vcpu).
        if enabled:
            boot.append(len(labels))
        labels.append(len(labels))
    if len(boot) != 1:
        raise model.not_modelled(f"a VM with {len(boot)} vCPUs enabled at boot")
    gic = _gic_frames(model, tree, root)
    doorbells = set()
    intids: list[tuple[int, int]] = []
    for path in tree.nodes:
        if tree.string(path, "vdevice-type") == "doorbell":
            label = tree.u32(path, "label")
            if label is None:
                raise model.not_modelled(f"the RM's answer to doorbell {path} without a label")
            doorbells.add(label)
            if gic is not None:
                intids.append((label, _doorbell_intid(model, tree, path)))
    return RmConfig(tuple(labels), boot[0], frozenset(doorbells), tuple(intids), gic)


def _gic_frames(model: GunyahModel, tree: DeviceTreeBlob, root: str) -> tuple[int, int] | None:
    """The GIC the VM config's ``interrupts { config = <phandle> }`` names (§7.3):
    the distributor and redistributor bases from its ``reg`` (two cells of
    address and size each, as the virt board writes it).  None when the tree
    names no GIC node: the model then has no GIC (a doorbell rung is a ``ModelGap``)."""
    phandle = tree.u32(f"{root}/interrupts", "config")
    node = next((p for p in tree.nodes if phandle is not None and tree.u32(p, "phandle") == phandle), None)
    if node is None:
        return None
    if "arm,gic-v3" not in tree.strings(node, "compatible"):
        raise model.not_modelled(f"a VM whose interrupt controller {node} is not a GICv3")
    reg = tree.prop(node, "reg") or b""
    if len(reg) < 32:
        raise model.not_modelled(f"GIC node {node} without distributor and redistributor frames in reg")
    distributor, _, redistributors, _ = struct.unpack(">QQQQ", reg[:32])
    return distributor, redistributors


def _doorbell_intid(model: GunyahModel, tree: DeviceTreeBlob, path: str) -> int:
    """The INTID a doorbell node's ``interrupts = <0 spi type>`` names."""
    cells = tree.prop(path, "interrupts") or b""
    if len(cells) < 12 or struct.unpack(">I", cells[:4])[0] != 0:
        raise model.not_modelled(f"doorbell {path} whose interrupts is not one SPI specifier")
    spi = int(struct.unpack(">I", cells[4:8])[0])
    if spi >= GIC_MAX_SPIS:
        raise model.not_modelled(f"doorbell {path} on SPI {spi}, beyond the GIC model's {GIC_MAX_SPIS}")
    return 32 + spi


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class ModelVcpu(FileObject):
    """A vCPU fd: the driver's ``struct gunyah_vcpu``, bound to the hypervisor's
    vCPU with the same label once the RM has made it (:attr:`hv`)."""

    kind = "gunyah-vcpu"
    model: GunyahModel

    UNKNOWN, READY, MMIO_READ, MMIO_WRITE, SYSTEM_DOWN = range(5)

    def __init__(self, vm: ModelVm, vcpu_id: int) -> None:
        super().__init__(vm.model)
        self.vm = vm
        self.id = vcpu_id
        self.page = SharedPage(name=f"gh-vcpu:{vcpu_id}")
        self.has_function = True
        #: The hypervisor resource (``vcpu->rsc``), None until populated.
        self.hv: HvVcpu | None = None
        self.state = self.UNKNOWN
        self.mmio_read_len = 0
        self.running_on: int | None = None
        #: ``vcpu->run_lock``: one RUN at a time; a second thread's RUN waits.
        self.run_lock = ObjectMutex(vm.model, f"vCPU {vcpu_id} run_lock")
        self._interrupt = threading.Event()

    @property
    def bound(self) -> bool:
        return self.hv is not None

    @handles(GH_VCPU_MMAP_SIZE, "GH_VCPU_MMAP_SIZE")
    def mmap_size(self, arg: int) -> int:
        return PAGE_SIZE

    def mmap(self, length: int, offset: int) -> mmap.mmap:
        if offset or length > PAGE_SIZE:
            # The driver maps any range, and touching a page other than 0 raises
            # SIGBUS (gunyah_vcpu_fault): the model cannot hand that out safely.
            raise self.model.not_modelled(f"a vCPU mapping beyond page 0 ({length:#x} at {offset:#x}: SIGBUS)")
        return self.page.map()

    def unbind(self) -> None:
        """``gunyah_vcpu_unbind``/``unpopulate``: set immediate_exit, wake the vCPU,
        wait for a run under way (``run_lock``), lose the resource."""
        if not self.closed:  # behaviour: unbind-sets-immediate-exit
            self.page.view[RUN_IMMEDIATE_EXIT] = 1
        self.has_function = False
        self.interrupt()
        if self.hv is not None:
            self.run_lock.acquire(interruptible=False)
            self.hv = None
            self.run_lock.release()

    def interrupt(self) -> None:
        """Wake the vCPU: out of a sleep, or out of the guest (a host interrupt)."""
        self._interrupt.set()
        hv = self.hv
        if hv is not None and hv.cpu is not None and self.running_on is not None:
            hv.cpu.kick()

    # --- GH_VCPU_RUN ------------------------------------------------------------
    @handles(GH_VCPU_RUN, "GH_VCPU_RUN")
    def run(self, arg: int) -> int:
        """``gunyah_vcpu_run``: the checks and state machine of the driver, then the
        hypervisor's ``vcpu_run`` hypercall in a loop until something is for the VMM.
        Every check after the run_lock is taken leaves through ``out:``, where a
        pending signal turns the errno into ERESTARTSYS (the rule still counts as
        broken: the VMM meets it again on its next RUN)."""
        if not self.has_function:
            raise RuleViolation(R_RUN_REMOVED, f"vCPU {self.id}")
        if not self.run_lock.acquire():  # behaviour: run-lock-interruptible
            return -ERESTARTSYS
        try:
            self.model.checkpoint(RUN_LOCK_TAKEN)
            result = self._run_locked()
        except RuleViolation as broken:
            call = self.model.current_call
            if call is None or not self.model.signal_pending():  # behaviour: rule-errno-under-signal
                raise
            self.model.reject(call, broken)
            result = -ERESTARTSYS
        finally:
            self.run_lock.release()
        # out: a pending signal turns any result into ERESTARTSYS -- even with an
        # exit just written to the page and the state left at MMIO_READ/WRITE (§6.5).
        if self.model.signal_pending():  # behaviour: exit-with-eintr
            return -ERESTARTSYS
        return result

    def _run_locked(self) -> int:
        hv = self.hv
        if hv is None:
            raise RuleViolation(R_RUN_UNBOUND, f"vCPU {self.id}")
        view = self.page.view
        resume: Resume | None = None
        if self.state == self.UNKNOWN:
            if self.vm.status != VmStatus.RUNNING and not self._check_system():  # behaviour: first-run-status
                return 0
            self.state = self.READY
        elif self.state in (self.MMIO_READ, self.MMIO_WRITE):
            action = view[RUN_MMIO_RESUME]
            if action == RESUME_HANDLED:  # behaviour: completion-handled
                is_read = self.state == self.MMIO_READ
                data = bytes(view[RUN_MMIO_DATA : RUN_MMIO_DATA + self.mmio_read_len]) if is_read else b""
                resume = Resume(RESUME_HANDLED, data)
            elif action == RESUME_FAULT:
                resume = Resume(RESUME_FAULT)
            else:
                raise RuleViolation(R_RESUME_ACTION, f"resume_action {action}")
            self.state = self.READY
        elif self.state == self.SYSTEM_DOWN:  # behaviour: status-sticky
            return 0  # the STATUS exit is still in the page, whatever immediate_exit says
        if self.model.caller != self.vm.owner:
            raise RuleViolation(R_FOREIGN_MM, f"caller {self.model.caller}, VM created by {self.vm.owner}")
        self.running_on = threading.get_ident()
        try:
            return self._run_loop(hv, resume)
        finally:
            self.running_on = None

    def _run_loop(self, hv: HvVcpu, resume: Resume | None) -> int:
        view = self.page.view
        while not self.model.signal_pending():  # behaviour: loop-checks-signals
            if view[RUN_IMMEDIATE_EXIT]:  # behaviour: immediate-exit
                # A completion taken out of the page above is lost here, as in the
                # driver: the hypercall that would have carried it is not made.
                return -errno.EINTR
            self.vm.poll_doorbells()
            outcome = self.model.hypervisor.vcpu_run(self, hv, resume)
            resume = None  # behaviour: resume-data-zeroed
            self.model.checkpoint(HYPERCALL_RETURNED)
            if outcome is Outcome.AGAIN:
                continue
            if outcome is Outcome.TO_USER:
                return 0
            if outcome is Outcome.SLEEP:
                woke = self.model.sleep_until(
                    lambda: self._wakeup_pending(hv), f"an interrupt for vCPU {self.id}", poll=self._poll(hv)
                )
                if not woke:  # behaviour: sleep-interrupted
                    return -ERESTARTSYS
                if not self._check_system():
                    return 0
                continue
            # Outcome.SYSTEM: the VM is no longer running.
            if not self._check_system():
                return 0
        return 0  # a signal ended the loop; run() turns this into ERESTARTSYS

    def _wakeup_pending(self, hv: HvVcpu) -> bool:
        """A sleeping vCPU wakes on its wake-up interrupt (the hypervisor raises it
        for a GIC interrupt signalled to the vCPU -- a doorbell's SPI, the virtual
        timer's PPI -- or a power-on), or the VM going down (§6.1 item 4)."""
        self.vm.poll_doorbells()
        return self.model.hypervisor.wakeup(hv) or self.vm.status != VmStatus.RUNNING or self._interrupted_flag()

    def _poll(self, hv: HvVcpu) -> float:
        """How long the sleep may go without a look: the doorbells' poll, or less
        when the vCPU's virtual timer fires sooner."""
        gic = self.vm.gic
        deadline = gic.cpus[hv.label].timer_deadline() if gic is not None else None
        return DOORBELL_POLL if deadline is None else max(0.0001, min(DOORBELL_POLL, deadline))

    def _interrupted_flag(self) -> bool:
        if self._interrupt.is_set():
            self._interrupt.clear()
            return True
        return False

    def _check_system(self) -> bool:
        """``gunyah_vcpu_check_system``: True while the VM runs; otherwise write the
        STATUS exit into the page and go SYSTEM_DOWN."""
        vm = self.vm
        if vm.status == VmStatus.RUNNING:
            return True
        view = self.page.view
        status = {VmStatus.INIT_FAILED: STATUS_LOAD_FAILED, VmStatus.EXITED: STATUS_EXITED}.get(
            vm.status, STATUS_CRASHED
        )
        struct.pack_into("<I", view, RUN_EXIT_REASON, EXIT_STATUS)
        struct.pack_into("<I", view, RUN_STATUS, status)
        reason = vm.exit_info.reason
        struct.pack_into("<HHI8s", view, RUN_EXIT_INFO, vm.exit_info.type, 0, len(reason), reason)
        self.state = self.SYSTEM_DOWN
        return False

    def report_mmio(self, address: int, length: int, is_write: bool, data: bytes) -> None:
        """``gunyah_handle_mmio``: an MMIO exit for the VMM, completed by the next
        RUN.  A read leaves ``data`` as it was (stale); a write copies ``len`` bytes."""
        view = self.page.view
        if is_write:  # behaviour: mmio-read-data-stale
            view[RUN_MMIO_DATA : RUN_MMIO_DATA + length] = data[:length]
        view[RUN_MMIO_IS_WRITE] = int(is_write)
        view[RUN_MMIO_RESUME] = RESUME_HANDLED
        struct.pack_into("<Q", view, RUN_MMIO_PHYS, address)
        struct.pack_into("<I", view, RUN_MMIO_LEN, length)
        struct.pack_into("<I", view, RUN_EXIT_REASON, EXIT_MMIO)
        self.state = self.MMIO_WRITE if is_write else self.MMIO_READ
        self.mmio_read_len = length

    def report_page_fault(self, address: int, attempt: int) -> None:
        """``gunyah_handle_page_fault``: resume_action is preset to FAULT, and the
        driver keeps no state for this exit (it never reads the action back)."""
        view = self.page.view
        view[RUN_PF_RESUME] = RESUME_FAULT
        struct.pack_into("<Qi", view, RUN_MMIO_PHYS, address, attempt)
        struct.pack_into("<I", view, RUN_EXIT_REASON, EXIT_PAGE_FAULT)

    def release(self) -> None:
        self.page.close()
        self.vm.put()


class Hypervisor:
    """The hypervisor's side of ``vcpu_run``: runs the guest on the software CPU
    and handles what Gunyah handles itself -- PSCI, WFI, demand paging, ioeventfd
    matches -- so only MMIO, page faults and status changes reach the driver's
    run loop."""

    def __init__(self, model: GunyahModel) -> None:
        self.model = model

    def vcpu_run(self, vcpu: ModelVcpu, hv: HvVcpu, resume: Resume | None) -> Outcome:
        vm = vcpu.vm
        self.model.stats.hypercalls += 1
        if vm.status != VmStatus.RUNNING:
            return Outcome.SYSTEM
        if hv.power_request is not None:
            self._power_on(hv, *hv.power_request)
        if not hv.powered_on:
            return Outcome.SLEEP
        # A vCPU in WFI stays there until an interrupt: a vcpu_run meanwhile (after
        # a signal ended the driver's wait) finds it still waiting.  Inferred from
        # the driver sleeping until the vCPU's wake-up interrupt (§6.1 item 4).
        if hv.waiting and not self.wakeup(hv):  # behaviour: wfi-waits-for-interrupt
            return Outcome.SLEEP
        hv.waiting = False
        if hv.faulted_at is not None:
            raise self.model.not_modelled(
                "running a vCPU again after a page-fault exit (the driver sends zeroed resume data; "
                "what the hypervisor does with the faulting fetch is not visible)"
            )
        cpu = self._cpu(vm, hv)
        if resume is not None:
            if resume.action != RESUME_HANDLED:
                raise self.model.not_modelled("fault injection into the guest (resume_action FAULT)")
            if resume.data:
                cpu.complete_read(resume.data)
        elif cpu.pending_read is not None:
            # The completion was lost (§6.5): the driver resumes with zeroed data,
            # action EMULATE, and the hypervisor takes resume_data_0 as the value
            # read (HYP vmmio.c addrspace_handle_vcpu_run_resume_read): 0.
            cpu.complete_read(bytes(8))
        # A host interrupt reaches only a guest that is running: drop a kick from a
        # signal the driver already delivered, then look again at what a new one
        # would be for (a later kick still stops the run).
        cpu.discard_kick()  # behaviour: stale-kick-discarded
        if self.model.signal_pending() or vcpu.page.view[RUN_IMMEDIATE_EXIT] or vm.status != VmStatus.RUNNING:
            return Outcome.AGAIN
        hv.wake_pending = False
        exit_ = cpu.run()
        while isinstance(exit_, MmioExit) and self._vgic_access(vm, cpu, exit_):
            exit_ = cpu.run()  # the hypervisor emulated it: the guest runs on
        if isinstance(exit_, MmioExit):
            if self._demand_page(vm, cpu, exit_.address, exit_.is_write):
                return Outcome.AGAIN  # the page is the guest's now: retry
            data = bytes(exit_.data[: exit_.size])
            if exit_.is_write:
                if vm.mmio_write_handled(exit_.address, exit_.size, int.from_bytes(data, "little")):
                    return Outcome.AGAIN  # the write is absorbed; no exit
                vcpu.report_mmio(exit_.address, exit_.size, True, data)
            else:
                vcpu.report_mmio(exit_.address, exit_.size, False, b"")
            return Outcome.TO_USER
        if exit_ is _POWERED_OFF:
            return Outcome.SLEEP  # PSCI CPU_OFF (POWERED_OFF)
        if exit_.kind is ExitKind.HLT:
            hv.waiting = True
            return Outcome.SLEEP  # WFI (EXPECTS_WAKEUP)
        if exit_ is _VM_DOWN:
            return Outcome.SYSTEM
        if exit_.kind is ExitKind.INTERRUPTED:
            return Outcome.AGAIN  # preempted (a signal or a kick): the driver loop decides
        fault = cpu.fetch_fault(exit_)
        if fault is not None:
            if self._demand_page(vm, cpu, fault, False):
                return Outcome.AGAIN
            hv.faulted_at = fault
            vcpu.report_page_fault(fault, -errno.ENOENT)
            return Outcome.TO_USER
        if isinstance(exit_, InternalErrorExit):
            # An exception the guest would take at its own vectors (an undefined
            # instruction, a data abort): the software CPU cannot deliver it, and
            # the model does not invent what the guest would do next.
            hv.crash_reason = exit_.description
            raise self.model.not_modelled(f"delivering a guest exception ({exit_.description})")
        raise self.model.not_modelled(f"a software-CPU exit of kind {exit_.kind.name} under Gunyah")

    def wakeup(self, hv: HvVcpu) -> bool:
        """Whether ``hv`` has something to leave WFI or power-off for: a wake-up
        (PSCI CPU_ON) or an interrupt its GIC CPU
        interface signals -- enabled, pending, above the priority mask; the
        virtual timer's PPI once its deadline passed (the hypervisor keeps the
        timer running while the vCPU sleeps: pyvmm writes no
        ``no-timer-wakeups``, §7.3, §2.2)."""
        return hv.wake_pending or (hv.cpu is not None and hv.powered_on and hv.cpu.irq_signalled())

    @staticmethod
    def _vgic_access(vm: ModelVm, cpu: GuestCpu, exit_: MmioExit) -> bool:
        """An access to the GIC's distributor or redistributors: the hypervisor's
        vGIC emulates it and no exit reaches the driver ("PSCI and the GIC are
        handled by the hypervisor", §6.1).  False for any other address."""
        gic = vm.gic
        if gic is None or not gic.contains(exit_.address):  # behaviour: vgic-owns-gic-frames
            return False
        if exit_.is_write:
            gic.mmio_write(exit_.address, exit_.size, int.from_bytes(bytes(exit_.data[: exit_.size]), "little"))
        else:
            value = gic.mmio_read(exit_.address, exit_.size) & ((1 << 8 * exit_.size) - 1)
            cpu.complete_read(value.to_bytes(exit_.size, "little"))
        return True

    def _demand_page(self, vm: ModelVm, cpu: GuestCpu, gpa: int, write: bool) -> bool:
        """``gunyah_gup_demand_page``: a fault inside a memory binding pages it in
        (True: retry).  No binding (-ENOENT), or a write to one without W (-EPERM),
        leaves the exit to the VMM.  The driver passes the page's stale ``is_write``
        here; it differs from the access only for a write to a binding without W,
        which pyvmm-gunyah never maps."""
        binding = vm.binding_at(gpa)
        if binding is None or cpu.mapped(gpa):  # behaviour: demand-page-needs-binding
            return False
        if write and not binding.flags & MEM_W:
            raise self.model.not_modelled("a guest write to a memory binding without GH_MEM_ALLOW_WRITE")
        vm.provide(binding, gpa)
        self.model.stats.demand_pages += 1
        self._map_binding(cpu, binding, gpa)
        return True

    @staticmethod
    def _map_binding(cpu: GuestCpu, binding: Binding, gpa: int) -> None:
        """Make ``gpa`` guest RAM for the engine: a lent binding page by page (each
        a donation the host notices), a shared one whole."""
        writable = bool(binding.flags & MEM_W)
        if binding.lent:
            page = gpa // PAGE_SIZE * PAGE_SIZE
            cpu.map(page, PAGE_SIZE, binding.host_page(gpa), writable=writable)
        else:
            cpu.map(binding.gpa, binding.size, binding.host_addr, writable=writable)

    def _cpu(self, vm: ModelVm, hv: HvVcpu) -> GuestCpu:
        if hv.cpu is None:
            cpu = GuestCpu("aarch64", hypercalls=lambda _engine, call: self._hypercall(vm, hv, call))
            for binding in vm.bindings:
                if not binding.lent:
                    self._map_binding(cpu, binding, binding.gpa)
            for page in sorted(vm.provided):
                lent = vm.binding_at(page)
                if lent is not None and lent.lent:
                    self._map_binding(cpu, lent, page)
            hv.cpu = cpu
            if vm.gic is not None:
                cpu.attach_gic(vm.gic.cpus[hv.label])
            if hv.boot_registers is not None:
                cpu.init(Aarch64VcpuInit(regs=hv.boot_registers))
        return hv.cpu

    def boot_registers(self, vm: ModelVm, entry: int, dtb: int) -> dict[int, int]:
        """What the RM sets on the boot vCPU: PC, X0 = DTB, EL1h with DAIF masked,
        then the boot context (§8.1)."""
        regs = {PC_ID: entry, PSTATE_ID: PSTATE_EL1H_DAIF, x_reg_id(0): dtb}
        for reg, value in vm.applied_boot_context().items():
            reg_set, index = reg >> 8, reg & 0xFF
            if reg_set == REG_SET_PC:
                regs[PC_ID] = value
            elif reg_set == REG_SET_X and index <= 30:
                regs[x_reg_id(index)] = value
            elif reg_set == REG_SET_SP and index <= 1:
                regs[SP_ID if index == 0 else SP_EL1_ID] = value
            else:
                raise self.model.not_modelled(f"what the RM does with boot context register {reg:#x} (X31 or SP_EL2)")
        return regs

    @staticmethod
    def _power_on(hv: HvVcpu, entry: int, context_id: int) -> None:
        """PSCI CPU_ON took effect: the vCPU starts at ``entry`` with X0 = context id."""
        hv.power_request = None
        hv.powered_on = True
        regs = {PC_ID: entry, PSTATE_ID: PSTATE_EL1H_DAIF, x_reg_id(0): context_id}
        if hv.cpu is None:
            hv.boot_registers = regs
        else:
            hv.cpu.init(Aarch64VcpuInit(regs=regs))

    # --- HVC/SMC: what Gunyah answers itself -------------------------------------
    def _hypercall(self, vm: ModelVm, hv: HvVcpu, call: Hypercall) -> VcpuExit | bool:
        function = call.function & 0xFFFFFFFF
        self.model.stats.psci_calls.append(function)
        if function == PSCI_SYSTEM_OFF:
            vm.exit(RM_PSCI_POWER_OFF)
            return _VM_DOWN
        if function == PSCI_SYSTEM_RESET:
            vm.exit(RM_PSCI_SYSTEM_RESET)
            return _VM_DOWN
        if function in (PSCI_SYSTEM_RESET2_32, PSCI_SYSTEM_RESET2_64):
            vm.exit(RM_PSCI_SYSTEM_RESET2, struct.pack("<I", call.args[0] & 0xFFFFFFFF))
            return _VM_DOWN
        if function == PSCI_CPU_OFF:
            hv.powered_on = False
            return _POWERED_OFF
        if function in (PSCI_CPU_ON_32, PSCI_CPU_ON_64):
            result = self._cpu_on(vm, call.args[0], call.args[1], call.args[2])
        elif function == PSCI_VERSION:
            result = PSCI_VERSION_1_1  # behaviour: psci-version
        elif function == SMCCC_VERSION_CALL:
            result = SMCCC_VERSION_1_3  # behaviour: smccc-version
        elif function == PSCI_FEATURES:
            result = self._psci_features(call.args[0] & 0xFFFFFFFF)
        elif function == SMCCC_ARCH_FEATURES_CALL:
            result = self._arch_features(call.args[0] & 0xFFFFFFFF)
        else:
            result = self._unanswered_call(function)
        assert hv.cpu is not None
        hv.cpu.engine.set_one_reg(x_reg_id(0), result & _U64)
        return True

    def _psci_features(self, queried: int) -> int:
        """PSCI_FEATURES as ``psci_features`` (psci_common.c) answers it: 0 (the
        table's ``feat`` constant) for a fast standard-owner function psci.ev lists in
        the queried convention, SUCCESS for SMCCC_VERSION, -1 for anything else."""
        if queried == SMCCC_VERSION_CALL:
            return PSCI_SUCCESS
        number = queried & 0xFFFF
        standard_fast = _smccc_owner(queried) == _OWNER_STANDARD and queried & _SMCCC_FAST
        if not standard_fast or queried & _SMCCC_RES0:
            return SMCCC_UNKNOWN_FUNCTION
        if number == 0x1:
            # CPU_SUSPEND's features come from a per-VM handler (the power-state format).
            raise self.model.not_modelled("PSCI_FEATURES(CPU_SUSPEND): the per-VM power-state format")
        table = _PSCI_BOTH if queried & _SMCCC_64 else {**_PSCI_SMC32_ONLY, **_PSCI_BOTH}
        return PSCI_SUCCESS if number in table else SMCCC_UNKNOWN_FUNCTION

    def _arch_features(self, queried: int) -> int:
        """SMCCC_ARCH_FEATURES as ``smccc_arch_features`` (smccc.c) answers it: the
        arch functions smccc.ev registers (VERSION, ARCH_FEATURES; SMC32 only) read
        0, the standard-hypervisor services are another module's answer, the rest -1."""
        owner = _smccc_owner(queried)
        if not queried & _SMCCC_FAST or queried & _SMCCC_RES0:
            return SMCCC_UNKNOWN_FUNCTION
        if owner == _OWNER_ARCH:
            registered = queried & 0xFFFF in (0x0, 0x1) and not queried & _SMCCC_64
            return PSCI_SUCCESS if registered else SMCCC_UNKNOWN_FUNCTION
        if owner == _OWNER_STANDARD_HYP:
            raise self.model.not_modelled(f"SMCCC_ARCH_FEATURES({queried:#x}): a standard-hypervisor service")
        return SMCCC_UNKNOWN_FUNCTION

    def _unanswered_call(self, function: int) -> int:
        """A call this model does not answer above: -1 where Gunyah answers -1 too,
        ``ModelGap`` where Gunyah implements it."""
        if function & _SMCCC_RES0 or not function & _SMCCC_FAST:
            # Reserved bits set (smccc_handle_call), or a yielding call: no module of
            # the open-source hypervisor takes one for a VM.
            return SMCCC_UNKNOWN_FUNCTION
        owner, number = _smccc_owner(function), function & 0xFFFF
        if owner == _OWNER_STANDARD:
            table = _PSCI_BOTH if function & _SMCCC_64 else {**_PSCI_SMC32_ONLY, **_PSCI_BOTH}
            if number in table and number not in _PSCI_MODELLED:
                raise self.model.not_modelled(f"PSCI {table[number]} ({function:#x})")
        elif owner in (_OWNER_STANDARD_HYP, _OWNER_VENDOR_HYP):
            # Call UID/revision (smccc.c) and Gunyah's own hypercalls (smccc_hypercalls.c).
            raise self.model.not_modelled(f"hypervisor service call {function:#x}")
        # No psci.ev entry, or an owner (CPU, SIP, OEM, trusted OS) no module of the
        # open-source tree subscribes to (hyp/vm/smccc/smccc.ev dispatch): the
        # default answer of smccc_handle_vcpu_trap_default.  A vendor's build may
        # handle SIP/OEM calls itself.
        return SMCCC_UNKNOWN_FUNCTION

    def _cpu_on(self, vm: ModelVm, target: int, entry: int, context_id: int) -> int:
        # The model's vCPUs have MPIDR affinity 0 = the vCPU's label and the rest 0.
        other = vm.hv_vcpus.get(target) if target < 256 else None
        if other is None:
            return PSCI_INVALID_PARAMETERS
        with self.model.lock:
            if other.powered_on or other.power_request is not None:
                return PSCI_ALREADY_ON
            other.power_request = (entry, context_id)
            other.wake_pending = True
            bound = [v for v in vm.vcpus.values() if v.hv is other]
        for vcpu in bound:
            vcpu.interrupt()
        self.model.notify()
        return PSCI_SUCCESS


#: Exits the hypercall handler ends a run with: the VM went down / the vCPU powered off.
_VM_DOWN = SystemEventExit(SystemEvent.SHUTDOWN)
_POWERED_OFF = HltExit()
