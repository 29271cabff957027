"""Check pyvmm_kvm.bindings against the host's <linux/kvm.h>.

The bindings are cffi ABI-mode declarations written by hand, so nothing but
this test notices a wrong field width or a missing pad.  The test generates a C
probe from the layout table below (itself generated from every struct and field
the FFI declares, so a newly added field is checked without editing this file),
compiles it with the system C compiler, and compares every size, alignment,
field offset, field size and exported constant -- ioctl numbers included.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest

from pyvmm_kvm import bindings
from pyvmm_kvm.bindings import ffi, ffi_aarch64

# Exported names that an x86_64 <linux/kvm.h> cannot evaluate, and why.
NOT_IN_X86_HEADER = {
    "KVM_MAX_CPUID_ENTRIES": "pyvmm's buffer size, not a uapi macro",
    # Need struct kvm_vcpu_init, which only the arm64 asm/kvm.h defines;
    # test_aarch64_layout checks them against the arm64 uapi sizes instead.
    "KVM_ARM_VCPU_INIT": "arm64 struct",
    "KVM_ARM_PREFERRED_TARGET": "arm64 struct",
    "KVM_ARM_VCPU_POWER_OFF": "arm64 asm/kvm.h",
    "KVM_ARM_VCPU_EL1_32BIT": "arm64 asm/kvm.h",
    "KVM_ARM_VCPU_PSCI_0_2": "arm64 asm/kvm.h",
    "KVM_ARM_VCPU_PMU_V3": "arm64 asm/kvm.h",
    "KVM_REG_ARM_COPROC_SHIFT": "arm64 asm/kvm.h",
    "KVM_REG_ARM_CORE": "arm64 asm/kvm.h",
}
# Checked when the build host's header is new enough to define them.
NEWER_THAN_SOME_HEADERS = {"KVM_EXIT_LOONGARCH_IOCSR", "KVM_EXIT_MEMORY_FAULT"}

# Fields the backend relies on by path; guards against the generated table
# silently losing them (e.g. if a union member were renamed or dropped).
REQUIRED_FIELDS = {
    "struct kvm_run": [
        "request_interrupt_window",
        "immediate_exit",
        "exit_reason",
        "kvm_valid_regs",
        "kvm_dirty_regs",
        "s",
        "io.direction",
        "io.size",
        "io.port",
        "io.count",
        "io.data_offset",
        "mmio.phys_addr",
        "mmio.data",
        "mmio.len",
        "mmio.is_write",
        "hw.hardware_exit_reason",
        "fail_entry.hardware_entry_failure_reason",
        "ex.exception",
        "ex.error_code",
        "internal.suberror",
        "internal.ndata",
        "internal.data",
        "system_event.type",
        "system_event.ndata",
        "system_event.data",
        "debug.arch.exception",
        "debug.arch.pc",
        "debug.arch.dr6",
        "debug.arch.dr7",
        "hypercall.nr",
        "tpr_access.rip",
        "eoi.vector",
        "padding",
    ],
}


@dataclass(frozen=True)
class Field:
    path: str  # C member designator, e.g. "io.port" or "redirtbl[0].fields.vector"
    offset: int
    size: int | None  # None for flexible array members (incomplete type)


def _cffi_path(path: str) -> list[str | int]:
    """'a[0].b' -> ['a', 0, 'b'], the argument form ffi.offsetof takes."""
    out: list[str | int] = []
    for part in path.split("."):
        m = re.fullmatch(r"(\w+)((?:\[\d+\])*)", part)
        assert m, part
        out.append(m.group(1))
        out.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return out


def _is_aggregate(ctype: Any) -> bool:
    return ctype.kind in ("struct", "union")


def _fields(cname: str, ctype: Any, prefix: str = "") -> list[Field]:
    out: list[Field] = []
    for name, field in ctype.fields:
        if field.bitsize != -1:
            continue  # offsetof() is undefined for bit-fields; the struct size still covers them
        path = prefix + name
        ftype = field.type
        flexible = ftype.kind == "array" and ftype.length is None
        offset = ffi.offsetof(cname, *_cffi_path(path))
        out.append(Field(path, offset, None if flexible else ffi.sizeof(ftype)))
        # Walk into named members too: the paths the backend uses (e.g.
        # run.debug.arch.pc) are then checked in the context they are read in.
        if _is_aggregate(ftype):
            out.extend(_fields(cname, ftype, path + "."))
        elif ftype.kind == "array" and _is_aggregate(ftype.item):
            out.extend(_fields(cname, ftype.item, path + "[0]."))
    return out


def _layout_table() -> dict[str, list[Field]]:
    _typedefs, structs, unions = ffi.list_types()
    assert not unions, "top-level unions are not probed yet"
    return {f"struct {s}": _fields(f"struct {s}", ffi.typeof(f"struct {s}")) for s in structs}


LAYOUT = _layout_table()


def _exported_constants() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(bindings).items()
        if re.fullmatch(r"KVM[A-Z0-9_]*", name) and isinstance(value, int)
    }


def _probe_source() -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/kvm.h>",
        "#define MEMBER_SIZE(T, m) sizeof(((T *)0)->m)",
        "int main(void) {",
    ]
    for cname, fields in LAYOUT.items():
        lines.append(f'  printf("S|{cname}|%zu|%zu\\n", sizeof({cname}), _Alignof({cname}));')
        for f in fields:
            size = "(size_t)-1" if f.size is None else f"MEMBER_SIZE({cname}, {f.path})"
            lines.append(f'  printf("F|{cname}|{f.path}|%zu|%zu\\n", offsetof({cname}, {f.path}), {size});')
    for name in _exported_constants():
        if name in NOT_IN_X86_HEADER:
            continue
        lines += [
            f"#ifdef {name}",
            f'  printf("C|{name}|%llu\\n", (unsigned long long)({name}));',
            "#else",
            f'  printf("M|{name}\\n");',
            "#endif",
        ]
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@dataclass
class Probe:
    structs: dict[str, tuple[int, int]]  # size, alignment
    fields: dict[tuple[str, str], tuple[int, int]]  # offset, size
    constants: dict[str, int]
    missing: set[str]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Probe:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no system C compiler `cc`: cannot compile the <linux/kvm.h> layout probe")
    tmp = tmp_path_factory.mktemp("kvm_probe")
    src = tmp / "probe.c"
    exe = tmp / "probe"
    src.write_text(_probe_source())
    build = subprocess.run([cc, "-std=gnu11", "-o", str(exe), str(src)], capture_output=True, text=True, check=False)
    if build.returncode != 0:
        if "linux/kvm.h" in build.stderr and "No such file" in build.stderr:
            pytest.skip("<linux/kvm.h> not installed (linux-libc-dev)")
        pytest.fail(f"layout probe did not compile ({src}):\n{build.stderr[-4000:]}")
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)

    result = Probe({}, {}, {}, set())
    for line in run.stdout.splitlines():
        kind, *rest = line.split("|")
        if kind == "S":
            result.structs[rest[0]] = (int(rest[1]), int(rest[2]))
        elif kind == "F":
            result.fields[(rest[0], rest[1])] = (int(rest[2]), int(rest[3]))
        elif kind == "C":
            result.constants[rest[0]] = int(rest[1])
        else:
            result.missing.add(rest[0])
    return result


def test_required_fields_are_declared() -> None:
    for cname, paths in REQUIRED_FIELDS.items():
        declared = {f.path for f in LAYOUT[cname]}
        missing = [p for p in paths if p not in declared]
        assert not missing, f"{cname}: fields not declared in bindings: {missing}"


@pytest.mark.parametrize("cname", sorted(LAYOUT))
def test_struct_layout_matches_header(probe: Probe, cname: str) -> None:
    errors: list[str] = []
    c_size, c_align = probe.structs[cname]
    if ffi.sizeof(cname) != c_size:
        errors.append(f"{cname}: sizeof bindings={ffi.sizeof(cname)} header={c_size}")
    if ffi.alignof(cname) != c_align:
        errors.append(f"{cname}: alignof bindings={ffi.alignof(cname)} header={c_align}")
    for f in LAYOUT[cname]:
        c_offset, c_fsize = probe.fields[(cname, f.path)]
        if f.offset != c_offset:
            errors.append(f"{cname}.{f.path}: offsetof bindings={f.offset} header={c_offset}")
        if f.size is not None and f.size != c_fsize:
            errors.append(f"{cname}.{f.path}: sizeof bindings={f.size} header={c_fsize}")
    assert not errors, "\n".join(errors)


def test_kvm_run_is_the_uapi_size(probe: Probe) -> None:
    # The union must be exactly 256 bytes and the sync-regs area 2048, or every
    # field after them (and KVM_GET_VCPU_MMAP_SIZE checks) is off.
    assert ffi.sizeof("struct kvm_run") == probe.structs["struct kvm_run"][0] == 2352
    assert ffi.offsetof("struct kvm_run", "kvm_valid_regs") == 32 + 256


def test_constants_match_header(probe: Probe) -> None:
    errors: list[str] = []
    for name, value in _exported_constants().items():
        if name in NOT_IN_X86_HEADER:
            continue
        if name in probe.missing:
            if name not in NEWER_THAN_SOME_HEADERS:
                errors.append(f"{name}: exported by bindings but not defined in <linux/kvm.h>")
            continue
        if probe.constants[name] != value:
            errors.append(f"{name}: bindings={value:#x} header={probe.constants[name]:#x}")
    assert not errors, "\n".join(errors)


def test_exit_reasons_match_header(probe: Probe) -> None:
    exits = {n: v for n, v in _exported_constants().items() if n.startswith("KVM_EXIT_")}
    assert "KVM_EXIT_NOTIFY" in exits
    for name, value in exits.items():
        if name in probe.missing and name in NEWER_THAN_SOME_HEADERS:
            continue
        assert name in probe.constants, f"{name}: not defined in <linux/kvm.h>"
        assert probe.constants[name] == value, f"{name}: bindings={value} header={probe.constants[name]}"


def test_exit_reason_names() -> None:
    not_reasons = ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")  # io.direction values, not exit reasons
    reasons = {n: v for n, v in _exported_constants().items() if n.startswith("KVM_EXIT_") and n not in not_reasons}
    assert {v: n for n, v in reasons.items()} == bindings.EXIT_REASON_NAMES
    # Every reason up to the newest must be named, or a backend prints a bare number.
    assert sorted(bindings.EXIT_REASON_NAMES) == list(range(max(bindings.EXIT_REASON_NAMES) + 1))


def test_ioctl_names() -> None:
    constants = _exported_constants()
    for number, name in bindings.IOCTL_NAMES.items():
        assert constants[name] == number, name
    # A dict literal silently drops duplicate keys: two ioctls with one number.
    ioctl_like = {n for n, v in constants.items() if (v >> 8) & 0xFF == bindings.KVMIO and v >= 0xAE00 and v < 1 << 32}
    assert ioctl_like == set(bindings.IOCTL_NAMES.values())


def test_aarch64_layout() -> None:
    # No arm64 header on an x86_64 host: these are the sizes from the arm64
    # uapi text (asm/kvm.h, asm/ptrace.h).
    a = ffi_aarch64
    assert a.sizeof("struct kvm_vcpu_init") == 32
    assert a.sizeof("struct user_pt_regs") == 272
    assert a.offsetof("struct user_pt_regs", "pc") == 256
    assert a.sizeof("struct user_fpsimd_state") == 528
    assert a.offsetof("struct user_fpsimd_state", "fpsr") == 512
    assert a.sizeof("struct kvm_regs") == 864
    assert a.alignof("struct kvm_regs") == 16
    assert a.offsetof("struct kvm_regs", "sp_el1") == 272
    assert a.offsetof("struct kvm_regs", "spsr") == 288
    assert a.offsetof("struct kvm_regs", "fp_regs") == 336
    assert a.sizeof("struct kvm_one_reg") == 16
    assert a.sizeof("struct kvm_debug_exit_arch") == 16
    assert a.sizeof("struct kvm_guest_debug") == 8 + 4 * 16 * 8
    assert bindings.KVM_ARM_VCPU_INIT == (1 << 30) | (32 << 16) | (0xAE << 8) | 0xAE
    assert bindings.KVM_ARM_PREFERRED_TARGET == (2 << 30) | (32 << 16) | (0xAE << 8) | 0xAF


def test_generic_structs_agree_between_arches() -> None:
    # The arch-independent cdef is shared; only the arch structs it embeds
    # differ, and they must fit in kvm_run's fixed-size unions.
    for cname in ("struct kvm_run", "struct kvm_userspace_memory_region", "struct kvm_one_reg", "struct kvm_irqfd"):
        assert ffi.sizeof(cname) == ffi_aarch64.sizeof(cname), cname
    for member in ("exit_reason", "io", "mmio", "kvm_valid_regs", "s"):
        assert ffi.offsetof("struct kvm_run", member) == ffi_aarch64.offsetof("struct kvm_run", member), member
