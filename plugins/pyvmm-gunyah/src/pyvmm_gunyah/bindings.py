"""Raw Gunyah uapi for pyvmm-gunyah: cffi declarations and constants, nothing else.

The interface is the one crosvm targets, "ABI B" in ``docs/backends/gunyah.md``
§2.1: the Android Common Kernel (android15+) and Qualcomm driver, whose header is
the ``GUNYAH_`` one with ``GH_VM_SET_USER_MEM_REGION`` kept at 0x1, plus the
Android ``'A'`` ioctls 0x11-0x17.  The struct names keep crosvm's ``gh_`` spelling
(ABI A's layout, binary-compatible with B: ``resume_action`` sits in A's tail
padding).  The guest_memfd series' ("ABI C") two extra structs are declared so
that a probe can name them, never used.

cffi runs in ABI mode: nothing is compiled at install or run time, so every struct
is written out with its exact layout.  No Gunyah header exists on a build host;
``tests/test_gunyah_bindings_layout.py`` checks every size and offset here against
the numbers in ``docs/backends/gunyah.md`` §4 and every ioctl number against §3.1.

ioctl numbers are computed from ``sizeof`` of the cffi structs, as the kernel's
``_IOW`` macros do, so a layout error also shows up as a wrong ioctl number.  The
encoding itself (asm-generic, arm64 and x86 alike) is the backend kit's
(:mod:`pyvmm.backend.ioctl`), and :data:`IOCTL_NAMES` is collected from the names
the requests are assigned to below.
"""

from __future__ import annotations

from typing import Final

from pyvmm.backend.ffi_cache import declared_ffi
from pyvmm.backend.ioctl import IoctlRequest, linux, request_names

_CDEF: Final = """
struct gh_userspace_memory_region {
    uint32_t label;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct gh_vm_dtb_config {
    uint64_t guest_phys_addr;
    uint64_t size;
};

struct gh_vm_firmware_config {
    uint64_t guest_phys_addr;
    uint64_t size;
};

struct gunyah_address_range {
    uint64_t guest_phys_addr;
    uint64_t size;
};

struct gh_vm_boot_context {
    uint32_t reg;
    uint32_t reserved;
    uint64_t value;
};

struct gh_fn_desc {
    uint32_t type;
    uint32_t arg_size;
    uint64_t arg;
};

struct gh_fn_vcpu_arg {
    uint32_t id;
};

struct gh_fn_irqfd_arg {
    uint32_t fd;
    uint32_t label;
    uint32_t flags;
    uint32_t padding;
};

struct gh_fn_ioeventfd_arg {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    uint32_t padding;
};

struct gh_vm_exit_info {
    uint16_t type;
    uint16_t padding;
    uint32_t reason_size;
    uint8_t reason[8];
};

struct gh_vcpu_run {
    uint8_t immediate_exit;
    uint8_t padding[7];
    uint32_t exit_reason;
    union {
        struct {
            uint64_t phys_addr;
            uint8_t data[8];
            uint32_t len;
            uint8_t is_write;
            uint8_t resume_action;
        } mmio;
        struct {
            uint32_t status;
            struct gh_vm_exit_info exit_info;
        } status;
        struct {
            uint64_t phys_addr;
            int32_t attempt;
            uint8_t resume_action;
        } page_fault;
    };
};

struct gunyah_map_cma_mem_args {
    uint32_t label;
    uint64_t guest_addr;
    uint32_t flags;
    uint32_t guest_mem_fd;
    uint64_t offset;
    uint64_t size;
};

struct gunyah_auth_desc {
    uint32_t type;
    uint32_t arg_size;
    uint64_t arg;
};

struct gunyah_qtvm_auth_arg {
    uint16_t vm_id;
    uint32_t pas_id;
    uint64_t guest_phys_addr;
    uint64_t size;
};

struct gunyah_create_mem_args {
    uint64_t flags;
    uint64_t size;
    uint64_t reserved[6];
};

struct gunyah_map_mem_args {
    uint64_t guest_addr;
    uint32_t flags;
    uint32_t guest_mem_fd;
    uint64_t offset;
    uint64_t size;
};
"""

# Parsed once per machine, not per process (pyvmm.backend.ffi_cache).
ffi: Final = declared_ffi(_CDEF)


# --- ioctl numbers (asm-generic/ioctl.h, used by x86 and arm64) -----------

GH_IOCTL_TYPE: Final = ord("G")
GH_ANDROID_IOCTL_TYPE: Final = ord("A")


# The kernel's _IOW takes a type and uses its sizeof; this takes the C type name
# and asks cffi, so the number follows the declared layout.
def _iow(kind: int, nr: int, ctype: str) -> IoctlRequest:
    return linux.iow(kind, nr, ffi.sizeof(ctype))


_G = GH_IOCTL_TYPE
_A = GH_ANDROID_IOCTL_TYPE

# --- /dev/gunyah ---
GH_CREATE_VM: Final = linux.io(_G, 0x0)
GUNYAH_CREATE_GUEST_MEM: Final = _iow(_G, 0x8, "struct gunyah_create_mem_args")  # ABI C only

# --- VM fd ---
GH_VM_SET_USER_MEM_REGION: Final = _iow(_G, 0x1, "struct gh_userspace_memory_region")
GH_VM_SET_DTB_CONFIG: Final = _iow(_G, 0x2, "struct gh_vm_dtb_config")
GH_VM_START: Final = linux.io(_G, 0x3)
GH_VM_ADD_FUNCTION: Final = _iow(_G, 0x4, "struct gh_fn_desc")
GH_VM_REMOVE_FUNCTION: Final = _iow(_G, 0x7, "struct gh_fn_desc")
GUNYAH_VM_MAP_MEM: Final = _iow(_G, 0x9, "struct gunyah_map_mem_args")  # ABI C only
GH_VM_SET_BOOT_CONTEXT: Final = _iow(_G, 0xA, "struct gh_vm_boot_context")
GH_ANDROID_TENTATIVE_UAPI: Final = linux.io(_A, 0x10)  # ABI A header only
GH_VM_ANDROID_LEND_USER_MEM: Final = _iow(_A, 0x11, "struct gh_userspace_memory_region")
GH_VM_ANDROID_SET_FW_CONFIG: Final = _iow(_A, 0x12, "struct gh_vm_firmware_config")
GH_VM_RECLAIM_REGION: Final = _iow(_A, 0x13, "struct gunyah_address_range")
GH_VM_ANDROID_MAP_CMA_MEM: Final = _iow(_A, 0x15, "struct gunyah_map_cma_mem_args")
GH_VM_ANDROID_SET_AUTH_TYPE: Final = _iow(_A, 0x16, "struct gunyah_auth_desc")
GH_VM_CHECK_EXTENSION: Final = linux.io(_A, 0x17)  # arg: the capability, by value

# --- vCPU fd ---
GH_VCPU_RUN: Final = linux.io(_G, 0x5)
GH_VCPU_MMAP_SIZE: Final = linux.io(_G, 0x6)

# --- gh_userspace_memory_region.flags (A/B) ---
GH_MEM_ALLOW_READ: Final = 1 << 0
GH_MEM_ALLOW_WRITE: Final = 1 << 1
GH_MEM_ALLOW_EXEC: Final = 1 << 2
GH_MEM_ALLOW_RWX: Final = GH_MEM_ALLOW_READ | GH_MEM_ALLOW_WRITE | GH_MEM_ALLOW_EXEC

# --- gunyah_map_flags, B values (MAP_CMA_MEM) ---
GUNYAH_MEM_FORCE_LEND: Final = 0x10
GUNYAH_MEM_FORCE_SHARE: Final = 0x20
GUNYAH_MEM_UNMAP: Final = 0x100

# --- gunyah_map_flags, C values (never used; they differ from B's) ---
GUNYAH_C_MEM_FORCE_LEND: Final = 0x1
GUNYAH_C_MEM_FORCE_SHARE: Final = 0x2
GUNYAH_C_MEM_ALLOW_READ: Final = 0x10
GUNYAH_C_MEM_ALLOW_WRITE: Final = 0x20
GUNYAH_C_MEM_ALLOW_EXEC: Final = 0x40
GUNYAH_C_MEM_UNMAP: Final = 0x100
GHMF_CLOEXEC: Final = 1
GHMF_ALLOW_HUGEPAGE: Final = 2

# --- gh_vm_boot_context.reg = (set & 0xff) << 8 | (index & 0xff) ---
GH_VM_BOOT_CONTEXT_REG_SHIFT: Final = 8
REG_SET_X: Final = 0  # index 0..31
REG_SET_PC: Final = 1  # index 0
REG_SET_SP: Final = 2  # index 0..2: the exception level whose SP it is


def boot_context_reg(reg_set: int, index: int) -> int:
    """``GUNYAH_VM_BOOT_CONTEXT_REG(reg, idx)``."""
    return ((reg_set & 0xFF) << GH_VM_BOOT_CONTEXT_REG_SHIFT) | (index & 0xFF)


# --- VM functions (gh_fn_desc.type) ---
GH_FN_VCPU: Final = 1
GH_FN_IRQFD: Final = 2
GH_FN_IOEVENTFD: Final = 3
GH_FN_MAX_ARG_SIZE: Final = 256

GH_IRQFD_LEVEL: Final = 1 << 0
GH_IOEVENTFD_DATAMATCH: Final = 1 << 0  # crosvm's `1 << GH_IOEVENTFD_DATAMATCH` (=2) is refused

# --- gh_vcpu_run ---
GH_VCPU_EXIT_UNKNOWN: Final = 0
GH_VCPU_EXIT_MMIO: Final = 1
GH_VCPU_EXIT_STATUS: Final = 2
GH_VCPU_EXIT_PAGE_FAULT: Final = 3  # B/C

GH_VM_STATUS_LOAD_FAILED: Final = 1
GH_VM_STATUS_EXITED: Final = 2
GH_VM_STATUS_CRASHED: Final = 3

GH_VCPU_RESUME_HANDLED: Final = 0
GH_VCPU_RESUME_FAULT: Final = 1
GH_VCPU_RESUME_RETRY: Final = 2

GH_VM_MAX_EXIT_REASON_SIZE: Final = 8

# Resource-manager exit types in gh_vm_exit_info.type (crosvm gunyah/mod.rs).
GH_RM_EXIT_TYPE_VM_EXIT: Final = 0
GH_RM_EXIT_TYPE_PSCI_POWER_OFF: Final = 1
GH_RM_EXIT_TYPE_PSCI_SYSTEM_RESET: Final = 2
GH_RM_EXIT_TYPE_PSCI_SYSTEM_RESET2: Final = 3
GH_RM_EXIT_TYPE_WDT_BITE: Final = 4
GH_RM_EXIT_TYPE_HYP_ERROR: Final = 5
GH_RM_EXIT_TYPE_ASYNC_EXT_ABORT: Final = 6
GH_RM_EXIT_TYPE_VM_FORCE_STOPPED: Final = 7

# --- GH_VM_CHECK_EXTENSION capabilities ---
GH_CAP_VCPU_TIMER_WAKEUP: Final = 0

# --- gunyah_auth_desc.type ---
GUNYAH_ANDROID_PVM_TYPE: Final = 0
GUNYAH_QCOM_TRUSTED_VM_TYPE: Final = 1

#: Name of every ioctl request, from the names above (for errors and call logs).
IOCTL_NAMES: Final = request_names(globals())
