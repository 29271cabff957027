"""Check the arm64 bindings against the arm64 uapi, on any host.

``bindings.ffi_aarch64`` and :mod:`pyvmm_kvm.arm64_uapi` are written by hand; this
compiles a probe against the arm64 ``<linux/kvm.h>`` (and so ``asm/kvm.h``) with
the aarch64 cross compiler, ``aarch64-linux-gnu-gcc`` (Debian:
``gcc-aarch64-linux-gnu``), and compares every struct size, alignment, field
offset and size of ``ffi_aarch64``, every ``KVM_*`` constant of ``arm64_uapi``,
and the ioctl numbers and constants the arm64 backend takes from ``bindings``.
The probe is never run: its answers are the initialiser of one array in the
object file, read back with pyelftools (a dependency of pyvmm-core).  On an
aarch64 host the native ``gcc`` does the same.
"""

from __future__ import annotations

import io
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from pyvmm_kvm import arm64_uapi, bindings
from pyvmm_kvm.bindings import ffi_aarch64

#: Names ``bindings`` exports that the arm64 backend uses, checked against the arm64 header.
FROM_BINDINGS = (
    "KVM_CREATE_VM",
    "KVM_CREATE_VCPU",
    "KVM_CHECK_EXTENSION",
    "KVM_RUN",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_GET_DIRTY_LOG",
    "KVM_IRQ_LINE",
    "KVM_IRQFD",
    "KVM_IOEVENTFD",
    "KVM_ENABLE_CAP",
    "KVM_GET_MP_STATE",
    "KVM_SET_MP_STATE",
    "KVM_GET_ONE_REG",
    "KVM_SET_ONE_REG",
    "KVM_GET_REG_LIST",
    "KVM_ARM_VCPU_INIT",
    "KVM_ARM_PREFERRED_TARGET",
    "KVM_ARM_VCPU_FINALIZE",
    "KVM_CREATE_DEVICE",
    "KVM_SET_DEVICE_ATTR",
    "KVM_GET_DEVICE_ATTR",
    "KVM_HAS_DEVICE_ATTR",
    "KVM_ARM_VCPU_POWER_OFF",
    "KVM_ARM_VCPU_EL1_32BIT",
    "KVM_ARM_VCPU_PSCI_0_2",
    "KVM_ARM_VCPU_PMU_V3",
    "KVM_REG_ARM64",
    "KVM_REG_SIZE_SHIFT",
    "KVM_REG_SIZE_MASK",
    "KVM_REG_SIZE_U32",
    "KVM_REG_SIZE_U64",
    "KVM_REG_SIZE_U128",
    "KVM_REG_ARM_COPROC_SHIFT",
    "KVM_REG_ARM_CORE",
    "KVM_CAP_IRQCHIP",
    "KVM_CAP_DEVICE_CTRL",
    "KVM_CAP_IRQFD",
    "KVM_CAP_IRQFD_RESAMPLE",
    "KVM_CAP_IOEVENTFD",
    "KVM_CAP_IOEVENTFD_ANY_LENGTH",
    "KVM_CAP_IMMEDIATE_EXIT",
    "KVM_CAP_READONLY_MEM",
    "KVM_CAP_ONE_REG",
    "KVM_CAP_ARM_PSCI_0_2",
    "KVM_CAP_ARM_VM_IPA_SIZE",
    "KVM_CAP_ENABLE_CAP_VM",
    "KVM_CAP_MAX_VCPUS",
    "KVM_CAP_NR_VCPUS",
    "KVM_EXIT_MMIO",
    "KVM_EXIT_INTR",
    "KVM_EXIT_SYSTEM_EVENT",
    "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_ARM_NISV",
    "KVM_SYSTEM_EVENT_SHUTDOWN",
    "KVM_SYSTEM_EVENT_RESET",
    "KVM_SYSTEM_EVENT_CRASH",
    "KVM_MP_STATE_RUNNABLE",
    "KVM_MP_STATE_STOPPED",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "KVM_IRQFD_FLAG_DEASSIGN",
    "KVM_IRQFD_FLAG_RESAMPLE",
    "KVM_IOEVENTFD_FLAG_DATAMATCH",
    "KVM_IOEVENTFD_FLAG_DEASSIGN",
)

#: The kernel's own size macros, which the uapi uses but does not export.
_PRELUDE = "#define SZ_64K 0x10000\n"


@dataclass(frozen=True)
class Probe:
    """One value the probe asks the compiler for, and what the bindings say."""

    what: str
    c_expr: str
    expected: int


def _fields(cname: str, ctype: Any, prefix: str = "") -> list[tuple[str, int, int | None]]:
    out: list[tuple[str, int, int | None]] = []
    for name, field in ctype.fields:
        if field.bitsize != -1:
            continue
        path = prefix + name
        ftype = field.type
        flexible = ftype.kind == "array" and ftype.length is None
        parts: list[str | int] = []
        for part in path.split("."):
            m = re.fullmatch(r"(\w+)((?:\[\d+\])*)", part)
            assert m, part
            parts.append(m.group(1))
            parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
        offset = ffi_aarch64.offsetof(cname, *parts)
        out.append((path, offset, None if flexible else ffi_aarch64.sizeof(ftype)))
        if ftype.kind in ("struct", "union"):
            out.extend(_fields(cname, ftype, path + "."))
        elif ftype.kind == "array" and ftype.item.kind == "struct":
            # Arrays of unions are the V-register stand-in (the header has __uint128_t
            # there): their size is checked, they have no members to compare.
            out.extend(_fields(cname, ftype.item, path + "[0]."))
    return out


def _probes() -> list[Probe]:
    probes: list[Probe] = []
    _typedefs, structs, _unions = ffi_aarch64.list_types()
    for struct in structs:
        cname = f"struct {struct}"
        probes.append(Probe(f"sizeof({cname})", f"sizeof({cname})", ffi_aarch64.sizeof(cname)))
        probes.append(Probe(f"alignof({cname})", f"_Alignof({cname})", ffi_aarch64.alignof(cname)))
        for path, offset, size in _fields(cname, ffi_aarch64.typeof(cname)):
            probes.append(Probe(f"offsetof({cname}, {path})", f"offsetof({cname}, {path})", offset))
            if size is not None:
                probes.append(Probe(f"sizeof({cname}.{path})", f"sizeof((({cname} *)0)->{path})", size))
    constants = {name: getattr(bindings, name) for name in FROM_BINDINGS}
    constants |= {n: v for n, v in vars(arm64_uapi).items() if re.fullmatch(r"KVM_[A-Z0-9_]+", n) and type(v) is int}
    probes += [Probe(name, f"(unsigned long long)({name})", value) for name, value in constants.items()]
    return probes


def _compiler() -> str | None:
    cross = shutil.which("aarch64-linux-gnu-gcc")
    if cross:
        return cross
    if platform.machine().lower() in ("aarch64", "arm64"):
        return shutil.which("gcc") or shutil.which("cc")
    return None


def _compile(probes: list[Probe], work: Path) -> list[int]:
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no aarch64 C compiler (apt-get install gcc-aarch64-linux-gnu): cannot read the arm64 uapi")
    values = ",\n".join(f"    {probe.c_expr}" for probe in probes)
    source = work / "probe.c"
    source.write_text(
        _PRELUDE + "#include <stddef.h>\n#include <linux/kvm.h>\n"
        f"const unsigned long long pyvmm_probe[{len(probes)}] = {{\n{values}\n}};\n"
    )
    build = subprocess.run(
        [compiler, "-std=gnu11", "-c", "-o", str(work / "probe.o"), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0:
        pytest.fail(f"arm64 layout probe did not compile ({source}):\n{build.stderr[-4000:]}")
    elf = ELFFile(io.BytesIO((work / "probe.o").read_bytes()))
    assert elf["e_machine"] == "EM_AARCH64"
    symtab = elf.get_section_by_name(".symtab")
    (symbol,) = symtab.get_symbol_by_name("pyvmm_probe")
    section = elf.get_section(symbol["st_shndx"])
    data = section.data()[symbol["st_value"] : symbol["st_value"] + 8 * len(probes)]
    return [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)]


def test_arm64_bindings_match_the_arm64_uapi(tmp_path: Path) -> None:
    probes = _probes()
    answers = _compile(probes, tmp_path)
    wrong = [
        f"{probe.what}: bindings {probe.expected:#x}, arm64 uapi {answer:#x}"
        for probe, answer in zip(probes, answers, strict=True)
        if probe.expected != answer
    ]
    assert not wrong, "\n".join(wrong)


def test_the_probe_covers_what_the_backend_reads() -> None:
    covered = {probe.what for probe in _probes()}
    for needed in (
        "sizeof(struct kvm_vcpu_init)",
        "offsetof(struct kvm_regs, fp_regs)",
        "offsetof(struct kvm_run, mmio.phys_addr)",
        "offsetof(struct kvm_run, system_event.type)",
        "offsetof(struct kvm_run, arm_nisv.fault_ipa)",
        "sizeof(struct kvm_device_attr)",
        "KVM_ARM_VCPU_INIT",
        "KVM_DEV_TYPE_ARM_VGIC_V3",
        "KVM_VGIC_V3_ADDR_TYPE_REDIST",
        "KVM_ARM_IRQ_TYPE_SPI",
    ):
        assert needed in covered, needed
