"""A driver model of ``/dev/gunyah`` (ABI B), for pyvmm-gunyah's tests.

It sits behind the plugin's OS seam (``pyvmm_gunyah.host.HOST.use(model)``) and
answers every call as the Android Common Kernel's Gunyah driver does, with the
resource manager (RM) and the hypervisor folded in, simplified where noted:

* the **driver** (``drivers/virt/gunyah/vm_mgr.c``, ``vm_mgr_mem.c``,
  ``gunyah_vcpu.c``, ``gunyah_irqfd.c``, ``gunyah_ioeventfd.c``): argument
  checks, errnos, object lifetimes, the vCPU run state machine;
* the **RM**: ``GH_VM_START``'s sequence reduced to what a VMM can observe --
  the config-image (DTB) parcel must lie in a memory binding, vCPU and doorbell
  resources are bound by id and label, the boot context is applied (auth NONE
  only), and the VM's exit notifications carry the RM exit types;
* the **hypervisor**: the guest runs on pyvmm's software CPU; it sets the boot
  registers itself (PC from the boot context, else the start of the region
  holding the DTB; X0 = the DTB address; EL1h with DAIF masked), handles PSCI
  (SYSTEM_OFF, SYSTEM_RESET(2), CPU_ON/OFF, VERSION) and sleeps a vCPU in WFI
  until a doorbell or a signal.

Every constraint is a module-level :class:`~pyvmm.testing.driver_model.Rule`
citing ``docs/backends/gunyah.md`` (``§N.M``) and, where the notes
does not spell it out, the driver source file.  Tests never tune the model to
the plugin: it reads the plugin's structs with its own ``struct`` formats, taken
from §4.

Why here, under ``tests/`` and not in the package: it is test infrastructure that
needs unicorn (a test dependency), and a fake hypervisor must never be selectable
in production.

Not modelled (a call that needs it raises ``ModelGap``): fault injection into the
guest (resume_action FAULT, page faults run again), CMA memory, authenticated VMs
(QTVM, pVM firmware authentication), ballooning after start, the RM's device-tree
parsing (the model takes the vCPUs and doorbells present at START as the DT's).
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
from pyvmm.testing.driver_model import (
    NO_SUCH_IOCTL,
    PAGE_SIZE,
    DeviceFileModel,
    FileObject,
    GuestCpu,
    Rule,
    RuleViolation,
    SharedPage,
    handles,
)

#: How often a sleeping vCPU looks at its doorbells' eventfds (seconds).
DOORBELL_POLL = 0.002

#: SP_EL1's one-reg id: ``struct kvm_regs.sp_el1``, word offset 2*34.
SP_EL1_ID = core_reg_id(2 * 34)

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
AUTH_ANDROID_PVM, AUTH_QCOM_TRUSTED_VM = 0, 1

_S = "docs/backends/gunyah.md"

# --- rules ----------------------------------------------------------------------------
R_CREATE_ARG = Rule(
    "GH-CREATE-VM-ARG",
    errno.EINVAL,
    "GH_CREATE_VM's argument is reserved and must be 0",
    f"{_S} §3.1 GH_CREATE_VM, §9.3; ACK vm_mgr.c gunyah_dev_ioctl_create_vm",
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
    f"{_S} §4.1 gh_userspace_memory_region; vm_mgr.c GH_VM_SET_USER_MEM_REGION",
)
R_MEM_ALIGN = Rule(
    "GH-MEM-ALIGN",
    errno.EINVAL,
    "a region's size must be non-zero and its size, guest and host addresses page-aligned",
    f"{_S} §4.1, §9.3; ACK vm_mgr_mem.c gunyah_vm_binding_alloc",
)
R_MEM_WRAP = Rule(
    "GH-MEM-WRAP",
    errno.EOVERFLOW,
    "guest_phys_addr + memory_size wraps",
    "ACK vm_mgr_mem.c gunyah_vm_binding_alloc (overflows_type)",
)
R_MEM_OVERLAP = Rule(
    "GH-MEM-OVERLAP",
    errno.EEXIST,
    "the guest range overlaps an existing memory binding",
    "ACK vm_mgr_mem.c gunyah_vm_binding_alloc (mtree_insert_range)",
)
R_MEM_LABEL = Rule(
    "GH-MEM-LABEL",
    errno.EEXIST,
    "a memory region label must be unique in its VM",
    f"{_S} §4.1 (the B driver itself has no duplicate-label check: this is the interface's documented rule)",
)
R_MEM_AFTER_START = Rule(
    "GH-MEM-AFTER-START",
    0,
    "memory given after START: the driver accepts it, the guest never learns of it",
    f"{_S} §5.1 step 2 ('all memory before start'); vm-manager.rst",
)
R_DTB_WRAP = Rule(
    "GH-DTB-WRAP",
    errno.EOVERFLOW,
    "DTB guest_phys_addr + size wraps",
    f"{_S} §3.2 GH_VM_SET_DTB_CONFIG",
)
R_FW_WRAP = Rule(
    "GH-FW-WRAP",
    errno.EOVERFLOW,
    "firmware guest_phys_addr + size wraps",
    "ACK vm_mgr.c GH_VM_ANDROID_SET_FW_CONFIG",
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
    f"{_S} §4.3 gh_fn_desc, §9.3; gunyah_vcpu.c/gunyah_irqfd.c/gunyah_ioeventfd.c *_bind",
)
R_FN_TYPE = Rule(
    "GH-FN-TYPE",
    errno.ENOENT,
    "no VM function of this type (1 vCPU, 2 irqfd, 3 ioeventfd)",
    "vm_mgr.c gunyah_vm_get_function",
)
R_FN_TICKET = Rule(
    "GH-FN-TICKET",
    errno.EEXIST,
    "a vCPU id or doorbell label already has a function in this VM",
    "vm_mgr.c gunyah_vm_add_resource_ticket",
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
    "gunyah_irqfd.c eventfd_ctx_fileget, gunyah_ioeventfd.c eventfd_ctx_fdget",
)
R_EVENTFD_BADF = Rule(
    "GH-EVENTFD-BADF",
    errno.EBADF,
    "the fd of an irqfd or ioeventfd is not open",
    "gunyah_irqfd.c fdget, gunyah_ioeventfd.c eventfd_ctx_fdget",
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
    f"{_S} §7.2 gh_fn_ioeventfd_arg",
)
R_IOEVENTFD_DATAMATCH_LEN = Rule(
    "GH-IOEVENTFD-DATAMATCH-LEN",
    errno.EINVAL,
    "DATAMATCH needs a length",
    f"{_S} §7.2 gh_fn_ioeventfd_arg",
)
R_IOEVENTFD_WRAP = Rule(
    "GH-IOEVENTFD-WRAP",
    errno.EINVAL,
    "ioeventfd addr + len wraps",
    "gunyah_ioeventfd.c gunyah_ioeventfd_bind (overflows_type)",
)
R_IOEVENTFD_DUP = Rule(
    "GH-IOEVENTFD-DUP",
    errno.EEXIST,
    "an ioeventfd already covers this address, length and data",
    f"{_S} §7.2; vm_mgr.c gunyah_vm_add_io_handler",
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
    f"{_S} §5.2 steps 2-3; vm_mgr.c gunyah_generic_pre_vm_configure, vm_mgr_mem.c gunyah_share_parcel",
)
R_START_DTB_MEMORY = Rule(
    "GH-START-DTB-MEMORY",
    errno.ENOENT,
    "START needs a memory binding at the DTB address",
    f"{_S} §5.2 steps 2-3; vm_mgr_mem.c gunyah_share_parcel (mtree_load)",
)
R_START_FAILED = Rule(
    "GH-START-NOT-RUNNING",
    errno.ENODEV,
    "START of a VM whose earlier START failed: it is not RUNNING",
    f"{_S} §5.2 GH_VM_START; vm_mgr.c gunyah_vm_ensure_started",
)
R_RUN_UNBOUND = Rule(
    "GH-RUN-BEFORE-START",
    errno.ENODEV,
    "RUN before START bound the vCPU's hypervisor resource",
    f"{_S} §6.1, §9.3; gunyah_vcpu.c gunyah_vcpu_run (!vcpu->rsc)",
)
R_RUN_REMOVED = Rule(
    "GH-RUN-REMOVED",
    errno.ENODEV,
    "RUN of a vCPU whose function was removed",
    "gunyah_vcpu.c gunyah_vcpu_run (!vcpu->f)",
)
R_RESUME_ACTION = Rule(
    "GH-RESUME-ACTION",
    errno.EINVAL,
    "after an MMIO exit, resume_action must be HANDLED (0) or FAULT (1)",
    f"{_S} §6.2; gunyah_vcpu.c gunyah_handle_mmio_resume",
)
R_MMAP_OFFSET = Rule(
    "GH-MMAP-OFFSET",
    errno.EFAULT,
    "only page 0 of a vCPU fd exists (the driver maps it and SIGBUSes on access; the model refuses the mmap)",
    f"{_S} §4.4 GH_VCPU_MMAP_SIZE; gunyah_vcpu.c gunyah_vcpu_fault",
)
R_RECLAIM_ALIGN = Rule(
    "GH-RECLAIM-ALIGN",
    errno.EINVAL,
    "RECLAIM_REGION range must be page-aligned",
    f"{_S} §3.2 GH_VM_RECLAIM_REGION",
)
R_AUTH_TYPE = Rule(
    "GH-AUTH-TYPE",
    errno.ENOENT,
    "no authentication manager for this auth type",
    "vm_mgr.c gunyah_get_auth_vm_mgr",
)

# PSCI function ids (Arm DEN0022) the hypervisor handles for the guest.
PSCI_VERSION = 0x84000000
PSCI_CPU_OFF = 0x84000002
PSCI_CPU_ON_32, PSCI_CPU_ON_64 = 0x84000003, 0xC4000003
PSCI_SYSTEM_OFF = 0x84000008
PSCI_SYSTEM_RESET = 0x84000009
PSCI_SYSTEM_RESET2_32, PSCI_SYSTEM_RESET2_64 = 0x84000012, 0xC4000012
PSCI_FEATURES = 0x8400000A
PSCI_SUCCESS, PSCI_NOT_SUPPORTED, PSCI_INVALID_PARAMETERS, PSCI_ALREADY_ON = 0, -1, -2, -4
#: PSCI 1.1, reported to the guest (a model choice: the version Gunyah reports is not in the reference).
PSCI_VERSION_1_1 = 0x00010001


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


@dataclass
class Function:
    """A VM function instance: its type and the argument bytes it was added with."""

    type: int
    arg: bytes
    target: object = None  # the vCPU file, or None


@dataclass
class IoHandler:
    """An ioeventfd: ``length`` 0 (no datamatch) matches any access length."""

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
        if bool(self.length) != bool(other.length):
            return True
        if self.length != other.length:
            return False
        if self.datamatch != other.datamatch:
            return True
        return self.data == other.data

    def matches(self, addr: int, length: int, value: int) -> bool:
        if addr != self.addr:
            return False
        if not self.length:
            return True
        return self.length == length and (not self.datamatch or self.data == value)


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


class Outcome(enum.Enum):
    """What one ``vcpu_run`` hypercall leaves the driver's run loop with."""

    AGAIN = "again"  # the hypervisor handled it (ioeventfd, PSCI, preemption): loop
    TO_USER = "to-user"  # an exit for the VMM is in the run page
    SLEEP = "sleep"  # WFI or powered off: wait for an interrupt
    SYSTEM = "system"  # the VM stopped running


@dataclass
class Resume:
    """The resume data the driver passes to the next ``vcpu_run`` hypercall."""

    action: int
    data: bytes = b""


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
        #: Host address ranges lent to a guest: the host has lost access to them.
        self.host_lost: list[tuple[int, int]] = []

    def host_may_access(self, host_addr: int, size: int = 1) -> bool:
        """False if any of ``size`` bytes at ``host_addr`` is lent to a running guest."""
        return not any(host_addr < a + n and a < host_addr + size for a, n in self.host_lost)

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
                if vcpu.running_on == thread_id and vcpu.cpu is not None:
                    vcpu.cpu.kick()

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
        """Install the model as pyvmm-gunyah's seam for the block."""
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
        self.auth: int | None = None  # None = GUNYAH_RM_VM_AUTH_NONE
        self.boot_context: dict[int, int] = {}
        self.functions: list[Function] = []
        self.vcpus: dict[int, ModelVcpu] = {}
        self.doorbells: dict[int, Doorbell] = {}
        self.io_handlers: list[IoHandler] = []
        self.exit_info = ExitInfo()
        self.dt_vcpus: set[int] = set()
        self.dt_doorbells: set[int] = set()
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
        self._check_owner()
        label, flags, gpa, size, host_addr = MEM_REGION.unpack(self.model.copy_from_user(arg, MEM_REGION.size))
        if flags & ~(MEM_R | MEM_W | MEM_X):
            raise RuleViolation(R_MEM_FLAGS, f"flags {flags:#x}")
        if not size or size % PAGE_SIZE or host_addr % PAGE_SIZE or gpa % PAGE_SIZE:
            raise RuleViolation(R_MEM_ALIGN, f"gpa {gpa:#x} size {size:#x} host {host_addr:#x}")
        if gpa + size > 1 << 64:
            raise RuleViolation(R_MEM_WRAP, f"{gpa:#x}+{size:#x}")
        with self.model.lock:
            for other in self.bindings:
                if gpa < other.end and other.gpa < gpa + size:
                    raise RuleViolation(R_MEM_OVERLAP, f"{gpa:#x}+{size:#x} overlaps label {other.label}")
                if other.label == label:
                    raise RuleViolation(R_MEM_LABEL, f"label {label}")
            self.bindings.append(Binding(label, flags, gpa, size, host_addr, lend))
            if lend:
                self.model.host_lost.append((host_addr, size))
        if self.status != VmStatus.NO_STATE:
            self.model.advise(R_MEM_AFTER_START, f"label {label} at {gpa:#x} after START")
        return 0

    def binding_at(self, gpa: int) -> Binding | None:
        for binding in self.bindings:
            if binding.gpa <= gpa < binding.end:
                return binding
        return None

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
        gpa, size = RANGE.unpack(self.model.copy_from_user(arg, RANGE.size))
        if gpa + size >= 1 << 64:
            raise RuleViolation(R_DTB_WRAP, f"{gpa:#x}+{size:#x}")
        self.dtb = (gpa, size)
        return 0

    @handles(GH_VM_ANDROID_SET_FW_CONFIG, "GH_VM_ANDROID_SET_FW_CONFIG")
    def set_fw_config(self, arg: int) -> int:
        gpa, size = RANGE.unpack(self.model.copy_from_user(arg, RANGE.size))
        if gpa + size >= 1 << 64:
            raise RuleViolation(R_FW_WRAP, f"{gpa:#x}+{size:#x}")
        self.firmware = (gpa, size)
        if self.auth is None:
            self.auth = AUTH_ANDROID_PVM
        return 0

    @handles(GH_VM_ANDROID_SET_AUTH_TYPE, "GH_VM_ANDROID_SET_AUTH_TYPE")
    def set_auth_type(self, arg: int) -> int:
        auth_type, _, _ = AUTH_DESC.unpack(self.model.copy_from_user(arg, AUTH_DESC.size))
        if auth_type not in (AUTH_ANDROID_PVM, AUTH_QCOM_TRUSTED_VM):
            raise RuleViolation(R_AUTH_TYPE, f"type {auth_type}")
        raise self.model.not_modelled("authenticated VMs (GH_VM_ANDROID_SET_AUTH_TYPE)")

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
        (vcpu_id,) = FN_VCPU.unpack(function.arg)
        if vcpu_id in self.vcpus:
            raise RuleViolation(R_FN_TICKET, f"vCPU {vcpu_id}")
        vcpu = ModelVcpu(self, vcpu_id)
        self.refs += 1
        function.target = vcpu
        self.vcpus[vcpu_id] = vcpu
        if self.status == VmStatus.RUNNING and vcpu_id in self.dt_vcpus:
            vcpu.bound = True
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
        if self.status == VmStatus.RUNNING and label in self.dt_doorbells:
            bell.bound = True
        self.doorbells[label] = bell
        return 0

    def _bind_ioeventfd(self, function: Function) -> int:
        datamatch, addr, length, fd, flags, _ = FN_IOEVENTFD.unpack(function.arg)
        if flags & ~IOEVENTFD_DATAMATCH:
            raise RuleViolation(R_IOEVENTFD_FLAGS, f"flags {flags:#x}")
        if length not in (0, 1, 2, 4, 8):
            raise RuleViolation(R_IOEVENTFD_LEN, f"len {length}")
        if addr + length >= 1 << 64:
            raise RuleViolation(R_IOEVENTFD_WRAP, f"{addr:#x}+{length}")
        if not length and flags & IOEVENTFD_DATAMATCH:
            raise RuleViolation(R_IOEVENTFD_DATAMATCH_LEN, f"addr {addr:#x}")
        self._check_eventfd(fd)
        # Without DATAMATCH the driver keeps no length: it then matches any access.
        has_match = bool(flags & IOEVENTFD_DATAMATCH)
        handler = IoHandler(addr, length if has_match else 0, has_match, datamatch, fd, function)
        if any(handler.clashes(other) for other in self.io_handlers):
            raise RuleViolation(R_IOEVENTFD_DUP, f"addr {addr:#x} len {length}")
        self.io_handlers.append(handler)
        return 0

    @handles(GH_VM_REMOVE_FUNCTION, "GH_VM_REMOVE_FUNCTION")
    def remove_function(self, arg: int) -> int:
        fn_type, arg_size, data = self._read_desc(arg)
        removed = 0
        with self.model.lock:
            for function in list(self.functions):
                if function.type == fn_type and self._same_function(function, data, arg_size):
                    self._unbind(function)
                    self.functions.remove(function)
                    removed += 1
        if not removed:
            raise RuleViolation(R_REMOVE_NONE, f"type {fn_type}")
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
            del self.vcpus[vcpu.id]
        elif function.type == FN_IRQFD_TYPE:
            del self.doorbells[FN_IRQFD.unpack(function.arg)[1]]
        else:
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
        self.status = VmStatus.LOAD
        pages = size // PAGE_SIZE
        if not pages:
            raise RuleViolation(R_START_DTB_SIZE, f"DTB size {size:#x}")
        binding = self.binding_at(gpa // PAGE_SIZE * PAGE_SIZE)
        if binding is None:
            raise RuleViolation(R_START_DTB_MEMORY, f"no binding at DTB {gpa:#x}")
        if self.firmware is not None and self.binding_at(self.firmware[0]) is None:
            raise self.model.not_modelled("firmware outside guest memory")
        # RM vm_init then the hypervisor resources: the model takes the vCPUs and
        # doorbells the VMM has at this point as those its device tree describes.
        self.dt_vcpus = set(self.vcpus)
        self.dt_doorbells = set(self.doorbells)
        for bell in self.doorbells.values():
            # Writes so far found no resource: "Premature injection", dropped.
            bell.dropped += self.model.drain_eventfd(bell.fd)
            bell.bound = True
        for vcpu in self.vcpus.values():
            vcpu.bound = True
        # The boot vCPU (the lowest id) runs; the others wait for PSCI CPU_ON.
        if self.vcpus:
            boot = self.vcpus[min(self.vcpus)]
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
        """The boot context the RM applied at start (auth NONE only, §5.2 step 7)."""
        return {} if self.auth is not None else dict(self.boot_context)

    # --- VM exit ----------------------------------------------------------------
    def exit(self, exit_type: int, reason: bytes = b"") -> None:
        """The RM's "VM exited" notification."""
        with self.model.lock:
            if self.status == VmStatus.RUNNING:
                self.status = VmStatus.EXITED
                self.exit_info = ExitInfo(exit_type, reason[:8])
        self.wake_all()

    def crash(self) -> None:
        with self.model.lock:
            if self.status == VmStatus.RUNNING:
                self.status = VmStatus.CRASHED
        self.wake_all()

    def wake_all(self) -> None:
        for vcpu in list(self.vcpus.values()):
            vcpu.interrupt()
        self.model.notify()

    # --- doorbells and ioeventfds -------------------------------------------------
    def poll_doorbells(self) -> bool:
        """Deliver doorbell writes since the last poll; True if any rang."""
        rang = False
        for bell in list(self.doorbells.values()):
            count = self.model.drain_eventfd(bell.fd)
            if not count:
                continue
            if bell.bound:
                bell.rung += count
                rang = True
            else:
                bell.dropped += count
        return rang

    def mmio_write_handled(self, addr: int, length: int, value: int) -> bool:
        """The driver's ioeventfd lookup for a guest MMIO write."""
        for handler in self.io_handlers:
            if handler.matches(addr, length, value):
                self.model.signal_eventfd(handler.fd)
                self.model.stats.ioevents_signalled += 1
                return True
        return False

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
                if binding.lent and (binding.host_addr, binding.size) in self.model.host_lost:
                    self.model.host_lost.remove((binding.host_addr, binding.size))
            for vcpu in self.vcpus.values():
                vcpu.unbind()
            if self in self.model.vms:
                self.model.vms.remove(self)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class ModelVcpu(FileObject):
    """A vCPU fd: ``struct gunyah_vcpu`` and the hypervisor's vCPU."""

    kind = "gunyah-vcpu"
    model: GunyahModel

    UNKNOWN, READY, MMIO_READ, MMIO_WRITE, SYSTEM_DOWN, PAGE_FAULT = range(6)

    def __init__(self, vm: ModelVm, vcpu_id: int) -> None:
        super().__init__(vm.model)
        self.vm = vm
        self.id = vcpu_id
        self.page = SharedPage(name=f"gh-vcpu:{vcpu_id}")
        self.has_function = True
        self.bound = False
        self.state = self.UNKNOWN
        self.mmio_read_len = 0
        self.powered_on = False
        self.running_on: int | None = None
        self.wake_pending = False
        self.power_request: tuple[int, int] | None = None
        self.boot_registers: dict[int, int] | None = None
        self.cpu: GuestCpu | None = None
        self.crash_reason = ""
        self._interrupt = threading.Event()

    @handles(GH_VCPU_MMAP_SIZE, "GH_VCPU_MMAP_SIZE")
    def mmap_size(self, arg: int) -> int:
        return PAGE_SIZE

    def mmap(self, length: int, offset: int) -> mmap.mmap:
        if offset:
            raise RuleViolation(R_MMAP_OFFSET, f"offset {offset:#x}")
        return self.page.map()

    def unbind(self) -> None:
        """``gunyah_vcpu_unbind``/``unpopulate``: set immediate_exit, lose the resource."""
        if not self.closed:
            self.page.view[RUN_IMMEDIATE_EXIT] = 1
        self.has_function = False
        self.bound = False
        self.interrupt()

    def interrupt(self) -> None:
        """Wake the vCPU: out of a sleep, or out of the guest (a host interrupt)."""
        self._interrupt.set()
        if self.cpu is not None and self.running_on is not None:
            self.cpu.kick()

    def set_x0(self, value: int) -> None:
        assert self.cpu is not None
        self.cpu.engine.set_one_reg(x_reg_id(0), value & (1 << 64) - 1)

    # --- GH_VCPU_RUN ------------------------------------------------------------
    @handles(GH_VCPU_RUN, "GH_VCPU_RUN")
    def run(self, arg: int) -> int:
        """``gunyah_vcpu_run``: the checks and state machine of the driver, then the
        hypervisor's ``vcpu_run`` hypercall in a loop until something is for the VMM."""
        if not self.has_function:
            raise RuleViolation(R_RUN_REMOVED, f"vCPU {self.id}")
        if not self.bound:
            raise RuleViolation(R_RUN_UNBOUND, f"vCPU {self.id}")
        view = self.page.view
        resume: Resume | None = None
        if self.state == self.UNKNOWN:
            if self.vm.status != VmStatus.RUNNING and not self._check_system():
                return 0
            self.state = self.READY
        elif self.state in (self.MMIO_READ, self.MMIO_WRITE):
            action = view[RUN_MMIO_RESUME]
            if action == RESUME_HANDLED:
                data = bytes(view[RUN_MMIO_DATA : RUN_MMIO_DATA + self.mmio_read_len])
                resume = Resume(RESUME_HANDLED, data if self.state == self.MMIO_READ else b"")
            elif action == RESUME_FAULT:
                resume = Resume(RESUME_FAULT)
            else:
                raise RuleViolation(R_RESUME_ACTION, f"resume_action {action}")
            self.state = self.READY
        elif self.state == self.SYSTEM_DOWN:
            return 0  # the STATUS exit is still in the page: sticky
        elif self.state == self.PAGE_FAULT:
            raise self.model.not_modelled("running a vCPU again after a page fault (fault injection)")
        if self.model.caller != self.vm.owner:
            raise RuleViolation(R_FOREIGN_MM, f"caller {self.model.caller}, VM created by {self.vm.owner}")
        self.running_on = threading.get_ident()
        try:
            return self._run_loop(resume)
        finally:
            self.running_on = None

    def _run_loop(self, resume: Resume | None) -> int:
        view = self.page.view
        while True:
            if view[RUN_IMMEDIATE_EXIT]:
                # A completion taken out of the page above is lost here, as in the
                # driver: the hypercall that would have carried it is not made.
                return -errno.EINTR
            if self.model.take_signal():
                return -errno.EINTR
            self.vm.poll_doorbells()
            outcome = self.model.hypervisor.vcpu_run(self, resume)
            resume = None
            if outcome is Outcome.AGAIN:
                continue
            if outcome is Outcome.TO_USER:
                return 0
            if outcome is Outcome.SLEEP:
                woke = self.model.sleep_until(
                    self._wakeup_pending, f"an interrupt for vCPU {self.id}", poll=DOORBELL_POLL
                )
                if not woke:
                    self.model.take_signal()
                    return -errno.EINTR
                if not self._check_system():
                    return 0
                continue
            # Outcome.SYSTEM: the VM is no longer running.
            if not self._check_system():
                return 0

    def _wakeup_pending(self) -> bool:
        """A sleeping vCPU wakes on a doorbell, a power-on, or the VM going down."""
        if self.vm.poll_doorbells():
            self.wake_pending = True
        return self.wake_pending or self.vm.status != VmStatus.RUNNING or self._interrupted_flag()

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
        """``gunyah_handle_mmio``: an MMIO exit for the VMM, completed by the next RUN."""
        view = self.page.view
        struct.pack_into("<I", view, RUN_EXIT_REASON, EXIT_MMIO)
        struct.pack_into("<Q", view, RUN_MMIO_PHYS, address)
        view[RUN_MMIO_DATA : RUN_MMIO_DATA + 8] = data.ljust(8, b"\0")[:8]
        struct.pack_into("<I", view, RUN_MMIO_LEN, length)
        view[RUN_MMIO_IS_WRITE] = int(is_write)
        view[RUN_MMIO_RESUME] = RESUME_HANDLED
        self.state = self.MMIO_WRITE if is_write else self.MMIO_READ
        self.mmio_read_len = length

    def report_page_fault(self, address: int, attempt: int) -> None:
        """``gunyah_handle_page_fault``: resume_action is preset to FAULT."""
        view = self.page.view
        struct.pack_into("<I", view, RUN_EXIT_REASON, EXIT_PAGE_FAULT)
        struct.pack_into("<Qi", view, RUN_MMIO_PHYS, address, attempt)
        view[RUN_PF_RESUME] = RESUME_FAULT
        self.state = self.PAGE_FAULT

    def release(self) -> None:
        if self.cpu is not None:
            self.cpu.close()
            self.cpu = None
        self.page.close()
        self.vm.put()


class Hypervisor:
    """The hypervisor's side of ``vcpu_run``: runs the guest on the software CPU
    and handles what Gunyah handles itself -- PSCI, WFI, ioeventfd matches -- so
    only MMIO, page faults and status changes reach the driver's run loop."""

    def __init__(self, model: GunyahModel) -> None:
        self.model = model

    def vcpu_run(self, vcpu: ModelVcpu, resume: Resume | None) -> Outcome:
        vm = vcpu.vm
        if vm.status != VmStatus.RUNNING:
            return Outcome.SYSTEM
        if vcpu.power_request is not None:
            self._power_on(vcpu, *vcpu.power_request)
        if not vcpu.powered_on:
            return Outcome.SLEEP
        cpu = self._cpu(vcpu)
        if resume is not None:
            if resume.action != RESUME_HANDLED:
                raise self.model.not_modelled("fault injection into the guest (resume_action FAULT)")
            if resume.data:
                cpu.complete_read(resume.data)
        vcpu.wake_pending = False
        exit_ = cpu.run()
        if isinstance(exit_, MmioExit):
            data = bytes(exit_.data[: exit_.size])
            if exit_.is_write:
                if vm.mmio_write_handled(exit_.address, exit_.size, int.from_bytes(data, "little")):
                    return Outcome.AGAIN  # the write is absorbed; no exit
                vcpu.report_mmio(exit_.address, exit_.size, True, data)
            else:
                vcpu.report_mmio(exit_.address, exit_.size, False, b"")
            return Outcome.TO_USER
        if exit_ is _POWERED_OFF or exit_.kind is ExitKind.HLT:
            return Outcome.SLEEP  # WFI (EXPECTS_WAKEUP) or PSCI CPU_OFF (POWERED_OFF)
        if exit_ is _VM_DOWN:
            return Outcome.SYSTEM
        if exit_.kind is ExitKind.INTERRUPTED:
            return Outcome.AGAIN  # preempted (a signal or a kick): the driver loop decides
        fault = cpu.fetch_fault(exit_)
        if fault is not None:
            vcpu.report_page_fault(fault, -errno.ENOENT)
            return Outcome.TO_USER
        if isinstance(exit_, InternalErrorExit):
            # An exception the guest would take at its own vectors: the software CPU
            # cannot deliver it, so the model ends the VM (status CRASHED).
            vcpu.crash_reason = exit_.description
            vm.crash()
            return Outcome.SYSTEM
        raise self.model.not_modelled(f"a software-CPU exit of kind {exit_.kind.name} under Gunyah")

    def _cpu(self, vcpu: ModelVcpu) -> GuestCpu:
        if vcpu.cpu is None:
            cpu = GuestCpu("aarch64", hypercalls=lambda _engine, call: self._hypercall(vcpu, call))
            for binding in vcpu.vm.bindings:
                cpu.map(binding.gpa, binding.size, binding.host_addr, writable=bool(binding.flags & MEM_W))
            vcpu.cpu = cpu
            if vcpu.boot_registers is not None:
                cpu.init(Aarch64VcpuInit(regs=vcpu.boot_registers))
        return vcpu.cpu

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
                raise self.model.not_modelled(f"boot context register {reg:#x} (X31 or SP_EL2)")
        return regs

    def _power_on(self, vcpu: ModelVcpu, entry: int, context_id: int) -> None:
        """PSCI CPU_ON took effect: the vCPU starts at ``entry`` with X0 = context id."""
        vcpu.power_request = None
        vcpu.powered_on = True
        regs = {PC_ID: entry, PSTATE_ID: PSTATE_EL1H_DAIF, x_reg_id(0): context_id}
        if vcpu.cpu is None:
            vcpu.boot_registers = regs
        else:
            vcpu.cpu.init(Aarch64VcpuInit(regs=regs))

    # --- HVC/SMC: what Gunyah answers itself -------------------------------------
    def _hypercall(self, vcpu: ModelVcpu, call: Hypercall) -> VcpuExit | bool:
        function = call.function & 0xFFFFFFFF
        self.model.stats.psci_calls.append(function)
        vm = vcpu.vm
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
            vcpu.powered_on = False
            return _POWERED_OFF
        if function in (PSCI_CPU_ON_32, PSCI_CPU_ON_64):
            result = self._cpu_on(vm, call.args[0], call.args[1], call.args[2])
        elif function == PSCI_VERSION:
            result = PSCI_VERSION_1_1
        elif function == PSCI_FEATURES:
            known = (PSCI_VERSION, PSCI_CPU_OFF, PSCI_CPU_ON_32, PSCI_CPU_ON_64, PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET,
                     PSCI_SYSTEM_RESET2_32, PSCI_SYSTEM_RESET2_64, PSCI_FEATURES)  # fmt: skip
            result = PSCI_SUCCESS if call.args[0] & 0xFFFFFFFF in known else PSCI_NOT_SUPPORTED
        else:
            # Gunyah answers what it does not implement itself; nothing reaches the VMM.
            result = PSCI_NOT_SUPPORTED
        vcpu.set_x0(result)
        return True

    def _cpu_on(self, vm: ModelVm, target: int, entry: int, context_id: int) -> int:
        # The model's vCPUs have MPIDR affinity 0 = vCPU id and the rest 0.
        other = vm.vcpus.get(target) if target < 256 else None
        if other is None or other.id not in vm.dt_vcpus:
            return PSCI_INVALID_PARAMETERS
        with self.model.lock:
            if other.powered_on or other.power_request is not None:
                return PSCI_ALREADY_ON
            other.power_request = (entry, context_id)
            other.wake_pending = True
        other.interrupt()
        self.model.notify()
        return PSCI_SUCCESS


#: Exits the hypercall handler ends a run with: the VM went down / the vCPU powered off.
_VM_DOWN = SystemEventExit(SystemEvent.SHUTDOWN)
_POWERED_OFF = HltExit()
