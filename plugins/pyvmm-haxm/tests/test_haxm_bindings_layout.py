"""Check pyvmm_haxm.bindings against the HAXM interface headers.

No HAXM header exists on a build host, so the expected numbers are written out
here from ``include/hax_interface.h``, ``include/hax_vcpu_state.h`` and the
per-OS ``include/*/hax_interface_*.h`` as ``docs/backends/haxm.md`` §3 records
them: struct sizes and field offsets (every struct is ``PACKED``), the ioctl
numbers of Linux and macOS and the ``DeviceIoControl`` codes of Windows.  Where a
C compiler exists, the bindings' own declarations are also compiled and their
layout read back, so cffi's ABI-mode layout is checked against the compiler's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm_haxm import bindings as b
from pyvmm_haxm.bindings import ffi

# haxm.md §3.3: struct -> (size, {field: offset})
LAYOUTS: dict[str, tuple[int, dict[str, int]]] = {
    "struct hax_module_version": (8, {"compat_version": 0, "cur_version": 4}),
    "struct hax_capabilityinfo": (16, {"wstatus": 0, "winfo": 2, "win_refcount": 4, "mem_quota": 8}),
    "struct hax_set_memlimit": (16, {"enable_memlimit": 0, "memory_limit": 8}),
    "struct hax_tunnel_info": (24, {"va": 0, "io_va": 8, "size": 16, "pad": 18}),
    "struct hax_alloc_ram_info": (16, {"size": 0, "pad": 4, "va": 8}),
    "struct hax_ramblock_info": (24, {"start_va": 0, "size": 8, "reserved": 16}),
    "struct hax_set_ram_info": (24, {"pa_start": 0, "size": 8, "flags": 12, "pad": 13, "va": 16}),
    "struct hax_set_ram_info2": (
        40,
        {"pa_start": 0, "size": 8, "va": 16, "flags": 24, "reserved1": 28, "reserved2": 32},
    ),
    "struct hax_protect_ram_info": (24, {"pa_start": 0, "size": 8, "flags": 16, "reserved": 20}),
    "struct hax_qemu_version": (8, {"cur_version": 0, "least_version": 4}),
    "struct vmx_msr": (16, {"entry": 0, "value": 8}),
    "struct hax_msr_data": (520, {"nr_msr": 0, "done": 2, "pad": 4, "entries": 8}),
    "struct fx_layout": (
        512,
        {
            "fcw": 0,
            "fsw": 2,
            "ftw": 4,
            "res1": 5,
            "fop": 6,
            "fip": 8,
            "fcs": 12,
            "fdp": 16,
            "fds": 20,
            "mxcsr": 24,
            "mxcsr_mask": 28,
            "st_mm": 32,
            "mmx_1": 160,
            "mmx_2": 288,
            "pad": 416,
        },
    ),
    "struct segment_desc_t": (24, {"selector": 0, "_dummy": 2, "limit": 4, "base": 8, "ar": 16, "ipad": 20}),
    "struct vcpu_state_t": (
        512,
        {
            "_regs": 0,
            "_rip": 128,
            "_rflags": 136,
            "_cs": 144,
            "_ss": 168,
            "_ds": 192,
            "_es": 216,
            "_fs": 240,
            "_gs": 264,
            "_ldt": 288,
            "_tr": 312,
            "_gdt": 336,
            "_idt": 360,
            "_cr0": 384,
            "_cr2": 392,
            "_cr3": 400,
            "_cr4": 408,
            "_dr0": 416,
            "_dr1": 424,
            "_dr2": 432,
            "_dr3": 440,
            "_dr6": 448,
            "_dr7": 456,
            "_pde": 464,
            "_efer": 472,
            "_sysenter_cs": 476,
            "_sysenter_eip": 480,
            "_sysenter_esp": 488,
            "_activity_state": 496,
            "pad": 500,
            "_interruptibility_state": 504,
        },
    ),
    "struct hax_tunnel": (
        56,
        {
            "_exit_reason": 0,
            "pad0": 4,
            "_exit_status": 8,
            "user_event_pending": 12,
            "ready_for_interrupt_injection": 16,
            "request_interrupt_window": 20,
            "io": 24,
            "mmio": 24,
            "pagefault": 24,
            "debug": 24,
            "apic_base": 48,
        },
    ),
    "struct hax_tunnel_io": (
        24,
        {"_direction": 0, "_df": 1, "_size": 2, "_port": 4, "_count": 6, "_flags": 8, "_vaddr": 16},
    ),
    "struct hax_tunnel_pagefault": (24, {"gpa": 0, "flags": 8}),
    "struct hax_tunnel_debug": (24, {"rip": 0, "dr6": 8, "dr7": 16}),
    "struct hax_fastmmio": (
        56,
        {"gpa": 0, "value": 8, "size": 16, "direction": 17, "reg_index": 18, "_cr0": 24, "_cr2": 32, "_cr3": 40},
    ),
    "struct hax_debug_t": (72, {"control": 0, "reserved": 4, "dr": 8}),
    "struct hax_cpuid_entry": (40, {"function": 0, "index": 4, "flags": 8, "eax": 12, "edx": 24, "pad": 28}),
    "struct hax_cpuid": (8, {"total": 0, "pad": 4, "entries": 8}),
}

# haxm.md §3.2: Linux _IOx(0, nr, T) (asm-generic) and macOS (BSD ioccom.h).
LINUX = {
    "VERSION": 0xC0080020,
    "CREATE_VM": 0xC0040021,
    "DESTROY_VM": 0x40040022,
    "CAPABILITY": 0x80100023,
    "SET_MEMLIMIT": 0xC0100024,
    "VCPU_CREATE": 0xC0040080,
    "ALLOC_RAM": 0xC0100081,
    "SET_RAM": 0xC0180082,
    "VCPU_DESTROY": 0x80040083,
    "NOTIFY_QEMU_VERSION": 0x40080084,
    "ADD_RAMBLOCK": 0x40180085,
    "SET_RAM2": 0xC0280086,
    "PROTECT_RAM": 0xC0180087,
    "RUN": 0x000000C0,
    "SET_MSRS": 0xC20800C1,
    "GET_MSRS": 0xC20800C2,
    "SET_FPU": 0x420000C3,
    "GET_FPU": 0x820000C4,
    "SETUP_TUNNEL": 0xC01800C5,
    "INTERRUPT": 0xC00400C6,
    "SET_REGS": 0xC20000C7,
    "GET_REGS": 0xC20000C8,
    "VCPU_DEBUG": 0x404800C9,
    "SET_CPUID": 0x400800CA,
    "GET_CPUID": 0x400800CB,
}
# macOS: IOC_OUT 0x40000000 for _IOR, IOC_IN 0x80000000 for _IOW, IOC_VOID 0x20000000 for _IO.
DARWIN_DIFFERENT = {
    "DESTROY_VM": 0x80040022,
    "CAPABILITY": 0x40100023,
    "VCPU_DESTROY": 0x40040083,
    "NOTIFY_QEMU_VERSION": 0x80080084,
    "ADD_RAMBLOCK": 0x80180085,
    "RUN": 0x200000C0,
    "SET_FPU": 0x820000C3,
    "GET_FPU": 0x420000C4,
    "VCPU_DEBUG": 0x804800C9,
    "SET_CPUID": 0x800800CA,
    "GET_CPUID": 0x800800CB,
}
# haxm.md §3.2: CTL_CODE(0x4000, fn, METHOD_BUFFERED, FILE_ANY_ACCESS) = 0x40000000 | fn << 2.
WINDOWS_FUNCTIONS = {
    "VERSION": 0x900,
    "CREATE_VM": 0x901,
    "VCPU_CREATE": 0x902,
    "ALLOC_RAM": 0x903,
    "SET_RAM": 0x904,
    "VCPU_DESTROY": 0x905,
    "RUN": 0x906,
    "SET_MSRS": 0x907,
    "GET_MSRS": 0x908,
    "SET_FPU": 0x909,
    "GET_FPU": 0x90A,
    "SETUP_TUNNEL": 0x90B,
    "INTERRUPT": 0x90C,
    "SET_REGS": 0x90D,
    "GET_REGS": 0x90E,
    "KICKOFF": 0x90F,
    "CAPABILITY": 0x910,
    "NOTIFY_QEMU_VERSION": 0x910,
    "SET_MEMLIMIT": 0x911,
    "ADD_RAMBLOCK": 0x913,
    "SET_RAM2": 0x914,
    "PROTECT_RAM": 0x915,
    "VCPU_DEBUG": 0x916,
    "SET_CPUID": 0x917,
    "GET_CPUID": 0x918,
}

# haxm.md §3.3, §7: constants the run loop and the model read.
CONSTANTS = {
    "HAX_CAP_STATUS_WORKING": 1,
    "HAX_CAP_MEMQUOTA": 2,
    "HAX_CAP_FAILREASON_VT": 1,
    "HAX_CAP_FAILREASON_NX": 2,
    "HAX_CAP_EPT": 1,
    "HAX_CAP_FASTMMIO": 2,
    "HAX_CAP_UG": 4,
    "HAX_CAP_64BIT_RAMBLOCK": 8,
    "HAX_CAP_64BIT_SETRAM": 0x10,
    "HAX_CAP_TUNNEL_PAGE": 0x20,
    "HAX_CAP_RAM_PROTECTION": 0x40,
    "HAX_CAP_DEBUG": 0x80,
    "HAX_CAP_IMPLICIT_RAMBLOCK": 0x100,
    "HAX_CAP_CPUID": 0x200,
    "HAX_RAM_INFO_ROM": 1,
    "HAX_RAM_INFO_STANDALONE": 0x40,
    "HAX_RAM_INFO_INVALID": 0x80,
    "HAX_IO_OUT": 0,
    "HAX_IO_IN": 1,
    "HAX_EXIT_IO": 1,
    "HAX_EXIT_MMIO": 2,
    "HAX_EXIT_REALMODE": 3,
    "HAX_EXIT_INTERRUPT": 4,
    "HAX_EXIT_UNKNOWN": 5,
    "HAX_EXIT_HLT": 6,
    "HAX_EXIT_STATECHANGE": 7,
    "HAX_EXIT_PAUSED": 8,
    "HAX_EXIT_FAST_MMIO": 9,
    "HAX_EXIT_PAGEFAULT": 10,
    "HAX_EXIT_DEBUG": 11,
    "IOS_MAX_BUFFER": 64,
    "HAX_MAX_MSR_ARRAY": 0x20,
    "HAX_MAX_VCPUS": 16,
    "HAX_MAX_VMS": 8,
}


def _offset(struct_name: str, field: str) -> int:
    return int(ffi.offsetof(struct_name, field))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_struct_layout(name: str) -> None:
    size, offsets = LAYOUTS[name]
    assert ffi.sizeof(name) == size
    for field, offset in offsets.items():
        assert _offset(name, field) == offset, f"{name}.{field}"


def test_segment_access_rights_bits() -> None:
    """``segment_desc_t``'s bit-field union (hax_vcpu_state.h) as masks of ``ar``."""
    assert (b.AR_TYPE_MASK, b.AR_S, b.AR_DPL_SHIFT, b.AR_PRESENT) == (0xF, 0x10, 5, 0x80)
    assert (b.AR_AVL, b.AR_L, b.AR_DB, b.AR_G, b.AR_NULL) == (1 << 12, 1 << 13, 1 << 14, 1 << 15, 1 << 16)


@pytest.mark.parametrize("name", sorted(LINUX))
def test_linux_and_macos_requests(name: str) -> None:
    assert getattr(b.LINUX, name) == LINUX[name], f"Linux {name}"
    assert getattr(b.DARWIN, name) == DARWIN_DIFFERENT.get(name, LINUX[name]), f"macOS {name}"


@pytest.mark.parametrize("name", sorted(WINDOWS_FUNCTIONS))
def test_windows_control_codes(name: str) -> None:
    assert getattr(b.WINDOWS, name) == 0x40000000 | WINDOWS_FUNCTIONS[name] << 2


def test_requests_one_side_only() -> None:
    assert b.LINUX.KICKOFF is None and b.DARWIN.KICKOFF is None
    assert b.WINDOWS.DESTROY_VM is None


def test_posix_names_name_each_request_once() -> None:
    assert b.POSIX_NAMES[LINUX["RUN"]] == "HAX_RUN"
    assert b.POSIX_NAMES[DARWIN_DIFFERENT["RUN"]] == "HAX_RUN"
    assert b.POSIX_NAMES[LINUX["CAPABILITY"]] == "HAX_CAPABILITY"


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constants(name: str) -> None:
    assert getattr(b, name) == CONSTANTS[name]


def test_device_paths() -> None:
    assert b.LINUX_PATHS.system == "/dev/HAX"
    assert b.LINUX_PATHS.vm_path(3) == "/dev/hax_vm/vm03"
    assert b.LINUX_PATHS.vcpu_path(3, 12) == "/dev/hax_vm03/vcpu12"
    assert b.WINDOWS_PATHS.system == r"\\.\HAX"
    assert b.WINDOWS_PATHS.vm_path(0) == r"\\.\hax_vm00"
    assert b.WINDOWS_PATHS.vcpu_path(1, 2) == r"\\.\hax_vm01_vcpu02"


def test_layout_compiled(tmp_path: Path) -> None:
    """The bindings' own declarations, compiled packed by the host C compiler,
    have the sizes and offsets above (cffi's ABI mode computes them itself)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: the compiled layout check needs one")
    lines = ["#include <stdint.h>", "#include <stddef.h>", "#include <stdio.h>", "#pragma pack(push, 1)"]
    lines.append(b._CDEF)
    lines.append("#pragma pack(pop)")
    lines.append("int main(void) {")
    for name, (_, offsets) in LAYOUTS.items():
        lines.append(f'printf("%s %zu\\n", "{name}", sizeof({name}));')
        for field in offsets:
            lines.append(f'printf("%s.%s %zu\\n", "{name}", "{field}", offsetof({name}, {field}));')
    lines.append("return 0; }")
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    build = subprocess.run([cc, "-std=gnu11", "-o", str(exe), str(source)], capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    output = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    measured = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in output}
    for name, (size, offsets) in LAYOUTS.items():
        assert measured[name] == size, name
        for field, offset in offsets.items():
            assert measured[f"{name}.{field}"] == offset, f"{name}.{field}"
