"""Check pyvmm_gunyah.bindings against the Gunyah uapi.

No Gunyah header exists on a build host, so the expected numbers are written
out here, taken from the upstream headers as ``docs/backends/gunyah.md`` records
them: the struct sizes and field offsets of §4 (computed there with gcc from the headers' struct text)
and the ioctl numbers of §3.1.  A wrong field width, a missing pad or a wrong
ioctl direction/size in the bindings fails here.
"""

from __future__ import annotations

import pytest

from pyvmm_gunyah import bindings as g
from pyvmm_gunyah.bindings import ffi

# gunyah.md §4: struct -> (size, {field path: offset})
LAYOUTS: dict[str, tuple[int, dict[str, int]]] = {
    "struct gh_userspace_memory_region": (
        32,
        {"label": 0, "flags": 4, "guest_phys_addr": 8, "memory_size": 16, "userspace_addr": 24},
    ),
    "struct gh_vm_dtb_config": (16, {"guest_phys_addr": 0, "size": 8}),
    "struct gh_vm_firmware_config": (16, {"guest_phys_addr": 0, "size": 8}),
    "struct gunyah_address_range": (16, {"guest_phys_addr": 0, "size": 8}),
    "struct gh_vm_boot_context": (16, {"reg": 0, "reserved": 4, "value": 8}),
    "struct gh_fn_desc": (16, {"type": 0, "arg_size": 4, "arg": 8}),
    "struct gh_fn_vcpu_arg": (4, {"id": 0}),
    "struct gh_fn_irqfd_arg": (16, {"fd": 0, "label": 4, "flags": 8, "padding": 12}),
    "struct gh_fn_ioeventfd_arg": (
        32,
        {"datamatch": 0, "addr": 8, "len": 16, "fd": 20, "flags": 24, "padding": 28},
    ),
    "struct gh_vm_exit_info": (16, {"type": 0, "padding": 2, "reason_size": 4, "reason": 8}),
    "struct gh_vcpu_run": (
        40,
        {
            "immediate_exit": 0,
            "padding": 1,
            "exit_reason": 8,
            "mmio.phys_addr": 16,
            "mmio.data": 24,
            "mmio.len": 32,
            "mmio.is_write": 36,
            "mmio.resume_action": 37,
            "status.status": 16,
            "status.exit_info": 20,
            "status.exit_info.type": 20,
            "status.exit_info.reason_size": 24,
            "status.exit_info.reason": 28,
            "page_fault.phys_addr": 16,
            "page_fault.attempt": 24,
            "page_fault.resume_action": 28,
        },
    ),
    "struct gunyah_map_cma_mem_args": (
        40,
        {"label": 0, "guest_addr": 8, "flags": 16, "guest_mem_fd": 20, "offset": 24, "size": 32},
    ),
    "struct gunyah_auth_desc": (16, {"type": 0, "arg_size": 4, "arg": 8}),
    "struct gunyah_qtvm_auth_arg": (24, {"vm_id": 0, "pas_id": 4, "guest_phys_addr": 8, "size": 16}),
    "struct gunyah_create_mem_args": (64, {"flags": 0, "size": 8, "reserved": 16}),
    "struct gunyah_map_mem_args": (32, {"guest_addr": 0, "flags": 8, "guest_mem_fd": 12, "offset": 16, "size": 24}),
}

# gunyah.md §4.4: field widths the run loop and the model depend on.
FIELD_SIZES = {
    ("struct gh_vcpu_run", "mmio", "data"): 8,
    ("struct gh_vcpu_run", "status", "exit_info", "reason"): 8,
    ("struct gh_vm_exit_info", "type"): 2,
    ("struct gh_fn_ioeventfd_arg", "fd"): 4,
}

# gunyah.md §3.1
IOCTLS = {
    "GH_CREATE_VM": 0x00004700,
    "GH_VM_SET_USER_MEM_REGION": 0x40204701,
    "GH_VM_SET_DTB_CONFIG": 0x40104702,
    "GH_VM_START": 0x00004703,
    "GH_VM_ADD_FUNCTION": 0x40104704,
    "GH_VCPU_RUN": 0x00004705,
    "GH_VCPU_MMAP_SIZE": 0x00004706,
    "GH_VM_REMOVE_FUNCTION": 0x40104707,
    "GUNYAH_CREATE_GUEST_MEM": 0x40404708,
    "GUNYAH_VM_MAP_MEM": 0x40204709,
    "GH_VM_SET_BOOT_CONTEXT": 0x4010470A,
    "GH_ANDROID_TENTATIVE_UAPI": 0x00004110,
    "GH_VM_ANDROID_LEND_USER_MEM": 0x40204111,
    "GH_VM_ANDROID_SET_FW_CONFIG": 0x40104112,
    "GH_VM_RECLAIM_REGION": 0x40104113,
    "GH_VM_ANDROID_MAP_CMA_MEM": 0x40284115,
    "GH_VM_ANDROID_SET_AUTH_TYPE": 0x40104116,
    "GH_VM_CHECK_EXTENSION": 0x00004117,
}

# gunyah.md §2.1, §4, §7
CONSTANTS = {
    "GH_MEM_ALLOW_READ": 1,
    "GH_MEM_ALLOW_WRITE": 2,
    "GH_MEM_ALLOW_EXEC": 4,
    "GUNYAH_MEM_FORCE_LEND": 0x10,
    "GUNYAH_MEM_FORCE_SHARE": 0x20,
    "GUNYAH_MEM_UNMAP": 0x100,
    "GUNYAH_C_MEM_FORCE_LEND": 1,
    "GUNYAH_C_MEM_FORCE_SHARE": 2,
    "GUNYAH_C_MEM_ALLOW_READ": 0x10,
    "GUNYAH_C_MEM_ALLOW_WRITE": 0x20,
    "GUNYAH_C_MEM_ALLOW_EXEC": 0x40,
    "REG_SET_X": 0,
    "REG_SET_PC": 1,
    "REG_SET_SP": 2,
    "GH_FN_VCPU": 1,
    "GH_FN_IRQFD": 2,
    "GH_FN_IOEVENTFD": 3,
    "GH_FN_MAX_ARG_SIZE": 256,
    "GH_IRQFD_LEVEL": 1,
    "GH_IOEVENTFD_DATAMATCH": 1,
    "GH_VCPU_EXIT_UNKNOWN": 0,
    "GH_VCPU_EXIT_MMIO": 1,
    "GH_VCPU_EXIT_STATUS": 2,
    "GH_VCPU_EXIT_PAGE_FAULT": 3,
    "GH_VM_STATUS_LOAD_FAILED": 1,
    "GH_VM_STATUS_EXITED": 2,
    "GH_VM_STATUS_CRASHED": 3,
    "GH_VCPU_RESUME_HANDLED": 0,
    "GH_VCPU_RESUME_FAULT": 1,
    "GH_VCPU_RESUME_RETRY": 2,
    "GH_RM_EXIT_TYPE_VM_EXIT": 0,
    "GH_RM_EXIT_TYPE_PSCI_POWER_OFF": 1,
    "GH_RM_EXIT_TYPE_PSCI_SYSTEM_RESET": 2,
    "GH_RM_EXIT_TYPE_PSCI_SYSTEM_RESET2": 3,
    "GH_RM_EXIT_TYPE_WDT_BITE": 4,
    "GH_RM_EXIT_TYPE_HYP_ERROR": 5,
    "GH_RM_EXIT_TYPE_ASYNC_EXT_ABORT": 6,
    "GH_RM_EXIT_TYPE_VM_FORCE_STOPPED": 7,
    "GH_CAP_VCPU_TIMER_WAKEUP": 0,
    "GUNYAH_ANDROID_PVM_TYPE": 0,
    "GUNYAH_QCOM_TRUSTED_VM_TYPE": 1,
}


def _offset(ctype: str, path: str) -> int:
    return int(ffi.offsetof(ctype, *path.split(".")))


@pytest.mark.parametrize("ctype", sorted(LAYOUTS))
def test_struct_layout(ctype: str) -> None:
    size, fields = LAYOUTS[ctype]
    assert ffi.sizeof(ctype) == size
    assert {path: _offset(ctype, path) for path in fields} == fields


def test_every_declared_struct_is_checked() -> None:
    declared = {f"struct {name}" for name in ffi.list_types()[1]}
    assert declared == set(LAYOUTS)


@pytest.mark.parametrize(("path", "size"), sorted(FIELD_SIZES.items()))
def test_field_width(path: tuple[str, ...], size: int) -> None:
    ctype, *fields = path
    current = ffi.typeof(ctype)
    for name in fields:
        current = dict(current.fields)[name].type
    assert ffi.sizeof(current) == size


@pytest.mark.parametrize(("name", "number"), sorted(IOCTLS.items()))
def test_ioctl_number(name: str, number: int) -> None:
    assert getattr(g, name) == number
    assert g.IOCTL_NAMES[number] == name


def test_every_ioctl_has_a_name() -> None:
    assert set(g.IOCTL_NAMES.values()) == set(IOCTLS)


@pytest.mark.parametrize(("name", "value"), sorted(CONSTANTS.items()))
def test_constant(name: str, value: int) -> None:
    assert getattr(g, name) == value


def test_boot_context_reg_encoding() -> None:
    # gunyah.md §4.2: reg = (set & 0xff) << 8 | (idx & 0xff)
    assert g.boot_context_reg(g.REG_SET_PC, 0) == 0x100
    assert g.boot_context_reg(g.REG_SET_X, 31) == 0x1F
    assert g.boot_context_reg(g.REG_SET_SP, 2) == 0x202


def test_crosvm_ioeventfd_flag_is_not_ours() -> None:
    # gunyah.md §7.2: crosvm's `1 << GH_IOEVENTFD_DATAMATCH` is 2, which the kernel refuses.
    assert g.GH_IOEVENTFD_DATAMATCH != 1 << 1
