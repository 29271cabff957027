"""``pyvmm_geniezone.bindings`` against the GenieZone uapi (``include/uapi/linux/gzvm.h``).

Two checks:

* **the header's numbers**: every struct size and field offset below was worked
  out from the header's struct text (natural alignment, arm64 LP64), and every
  ioctl number from its ``_IO``/``_IOW``/``_IOWR`` line (``docs/backends/
  geniezone.md`` §3 lists them).  A wrong field width, a missing pad or a wrong
  ioctl direction or size in the bindings fails here on any host;
* **a compiler's layout**: where ``aarch64-linux-gnu-gcc`` is installed, the
  bindings' own C declarations are compiled for arm64 with the kernel's
  ``<linux/ioctl.h>`` and the compiler's ``sizeof``/``offsetof`` and ``_IOW``
  values are read back from the object file -- so cffi's ABI-mode layout is the
  one arm64 code gets.  Without the compiler that test is skipped, saying so.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm_geniezone import bindings as g
from pyvmm_geniezone.bindings import ffi

#: struct -> (size, {field path: offset}), from the header's struct text.
LAYOUTS: dict[str, tuple[int, dict[str, int]]] = {
    "struct gzvm_memory_region": (24, {"slot": 0, "flags": 4, "guest_phys_addr": 8, "memory_size": 16}),
    "struct gzvm_userspace_memory_region": (
        32,
        {"slot": 0, "flags": 4, "guest_phys_addr": 8, "memory_size": 16, "userspace_addr": 24},
    ),
    "struct gzvm_irq_level": (8, {"irq": 0, "status": 0, "level": 4}),
    "struct gzvm_create_device": (
        48,
        {"dev_type": 0, "id": 4, "flags": 8, "dev_addr": 16, "dev_reg_size": 24, "attr_addr": 32, "attr_size": 40},
    ),
    "struct gzvm_vcpu_run": (
        264,
        {
            "exit_reason": 0,
            "immediate_exit": 4,
            "padding1": 5,
            "mmio.phys_addr": 8,
            "mmio.data": 16,
            "mmio.size": 24,
            "mmio.reg_nr": 32,
            "mmio.is_write": 36,
            "fail_entry.hardware_entry_failure_reason": 8,
            "fail_entry.cpu": 16,
            "exception.exception": 8,
            "exception.error_code": 12,
            "exception.fault_gpa": 16,
            "exception.reserved": 24,
            "hypercall.args": 8,
            "internal.suberror": 8,
            "internal.ndata": 12,
            "internal.data": 16,
            "system_event.type": 8,
            "system_event.ndata": 12,
            "system_event.data": 16,
            "padding": 8,
        },
    ),
    "struct gzvm_enable_cap": (48, {"cap": 0, "args": 8}),
    "struct gzvm_one_reg": (16, {"id": 0, "addr": 8}),
    "struct gzvm_irqfd": (32, {"fd": 0, "gsi": 4, "flags": 8, "resamplefd": 12, "pad": 16}),
    "struct gzvm_ioeventfd": (64, {"datamatch": 0, "addr": 8, "len": 16, "fd": 20, "flags": 24, "pad": 28}),
    "struct gzvm_dtb_config": (16, {"dtb_addr": 0, "dtb_size": 8}),
}

#: The header's ioctl lines, encoded (asm-generic: dir << 30 | size << 16 | 0x92 << 8 | nr).
IOCTLS = {
    "GZVM_CREATE_VM": 0x00009201,
    "GZVM_CHECK_EXTENSION": 0x00009203,
    "GZVM_SET_MEMORY_REGION": 0x40189240,
    "GZVM_CREATE_VCPU": 0x00009241,
    "GZVM_SET_USER_MEMORY_REGION": 0x40209246,
    "GZVM_IRQ_LINE": 0x40089261,
    "GZVM_IRQFD": 0x40209276,
    "GZVM_IOEVENTFD": 0x40409279,
    "GZVM_RUN": 0x00009280,
    "GZVM_ENABLE_CAP": 0x403092A3,
    "GZVM_GET_ONE_REG": 0x401092AB,
    "GZVM_SET_ONE_REG": 0x401092AC,
    "GZVM_CREATE_DEVICE": 0xC03092E0,
    "GZVM_SET_DTB_CONFIG": 0x401092FF,
}

#: How each ioctl is written in the header (for the compiled check).
IOCTL_MACROS = {
    "GZVM_CREATE_VM": "_IO(0x92, 0x01)",
    "GZVM_CHECK_EXTENSION": "_IO(0x92, 0x03)",
    "GZVM_SET_MEMORY_REGION": "_IOW(0x92, 0x40, struct gzvm_memory_region)",
    "GZVM_CREATE_VCPU": "_IO(0x92, 0x41)",
    "GZVM_SET_USER_MEMORY_REGION": "_IOW(0x92, 0x46, struct gzvm_userspace_memory_region)",
    "GZVM_IRQ_LINE": "_IOW(0x92, 0x61, struct gzvm_irq_level)",
    "GZVM_IRQFD": "_IOW(0x92, 0x76, struct gzvm_irqfd)",
    "GZVM_IOEVENTFD": "_IOW(0x92, 0x79, struct gzvm_ioeventfd)",
    "GZVM_RUN": "_IO(0x92, 0x80)",
    "GZVM_ENABLE_CAP": "_IOW(0x92, 0xa3, struct gzvm_enable_cap)",
    "GZVM_GET_ONE_REG": "_IOW(0x92, 0xab, struct gzvm_one_reg)",
    "GZVM_SET_ONE_REG": "_IOW(0x92, 0xac, struct gzvm_one_reg)",
    "GZVM_CREATE_DEVICE": "_IOWR(0x92, 0xe0, struct gzvm_create_device)",
    "GZVM_SET_DTB_CONFIG": "_IOW(0x92, 0xff, struct gzvm_dtb_config)",
}

#: Field widths the run loop depends on.
FIELD_SIZES = {
    ("struct gzvm_vcpu_run", "mmio", "data"): 8,
    ("struct gzvm_vcpu_run", "mmio", "size"): 8,
    ("struct gzvm_vcpu_run", "hypercall", "args"): 64,
    ("struct gzvm_vcpu_run", "padding"): 256,
    ("struct gzvm_ioeventfd", "fd"): 4,
}


def cffi_offset(ctype: str, path: str) -> int:
    return int(ffi.offsetof(ctype, *path.split(".")))


@pytest.mark.parametrize("ctype", sorted(LAYOUTS))
def test_struct_layout_is_the_headers(ctype: str) -> None:
    size, offsets = LAYOUTS[ctype]
    assert ffi.sizeof(ctype) == size
    assert {path: cffi_offset(ctype, path) for path in offsets} == offsets


def test_every_declared_struct_is_checked() -> None:
    assert set(g.STRUCTS) == set(LAYOUTS)


@pytest.mark.parametrize(("path", "size"), list(FIELD_SIZES.items()))
def test_field_widths(path: tuple[str, ...], size: int) -> None:
    ctype, *fields = path
    field_type = ffi.typeof(ctype)
    for name in fields:
        field_type = dict(field_type.fields)[name].type
    assert ffi.sizeof(field_type) == size


@pytest.mark.parametrize(("name", "number"), sorted(IOCTLS.items()))
def test_ioctl_number_is_the_headers(name: str, number: int) -> None:
    assert getattr(g, name) == number
    assert g.IOCTL_NAMES[number] == name


def test_every_ioctl_is_named_once() -> None:
    assert sorted(g.IOCTL_NAMES.values()) == sorted(IOCTLS)


COMPILER = shutil.which("aarch64-linux-gnu-gcc")
OBJCOPY = shutil.which("aarch64-linux-gnu-objcopy")


def compiled_values(tmp_path: Path, expressions: list[str]) -> list[int]:
    """The arm64 compiler's value of each C expression: an initialised array
    compiled (never run) and read back from the object's ``.data``."""
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stddef.h>\n#include <stdint.h>\n#include <linux/ioctl.h>\n"
        + g.declarations()
        + "\nunsigned long long layout_values[] = {\n"
        + "".join(f"    (unsigned long long)({expression}),\n" for expression in expressions)
        + "};\n"
    )
    obj, data = tmp_path / "layout.o", tmp_path / "layout.bin"
    subprocess.run([COMPILER, "-c", "-O0", "-o", str(obj), str(source)], check=True, capture_output=True)
    subprocess.run([OBJCOPY, "-O", "binary", "-j", ".data", str(obj), str(data)], check=True, capture_output=True)
    raw = data.read_bytes()
    return list(struct.unpack(f"<{len(expressions)}Q", raw[: 8 * len(expressions)]))


@pytest.mark.skipif(
    COMPILER is None or OBJCOPY is None,
    reason="no aarch64-linux-gnu-gcc/objcopy: the compiled layout check needs an arm64 cross compiler "
    "(apt-get install gcc-aarch64-linux-gnu)",
)
def test_an_arm64_compiler_lays_the_declarations_out_as_cffi_does(tmp_path: Path) -> None:
    checks: list[tuple[str, int]] = []
    for ctype, (_, offsets) in LAYOUTS.items():
        checks.append((f"sizeof({ctype})", ffi.sizeof(ctype)))
        checks.extend((f"offsetof({ctype}, {path})", cffi_offset(ctype, path)) for path in offsets)
    checks.extend((macro, int(getattr(g, name))) for name, macro in IOCTL_MACROS.items())
    values = compiled_values(tmp_path, [expression for expression, _ in checks])
    mismatches = [(e, v, want) for (e, want), v in zip(checks, values, strict=True) if v != want]
    assert mismatches == []
