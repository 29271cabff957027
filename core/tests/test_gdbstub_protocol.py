"""The gdb stub's parts that need no guest: packet framing, the address
option, the target descriptions and x86 page-table walks."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET

import pytest

from pyvmm.config import MemoryRegionSpec
from pyvmm.gdbstub.address import parse_gdb_address
from pyvmm.gdbstub.packets import PacketReader, ProtocolError, checksum, frame, unescape
from pyvmm.gdbstub.registers import AARCH64_XML, X86_64_XML, Aarch64Registers, X86Registers
from pyvmm.gdbstub.translate import CR0_PG, CR4_PAE, EFER_LMA, TranslationError, x86_translate
from pyvmm.memory import GuestMemory


def test_frame_and_read_back() -> None:
    packet = frame(b"m100000,4")
    assert packet == b"$m100000,4#%02x" % checksum(b"m100000,4")
    reader = PacketReader()
    assert reader.feed(b"+" + packet[:5]) == [("ack", b"+")]
    assert reader.feed(packet[5:] + b"\x03") == [("packet", b"m100000,4"), ("interrupt", b"")]


def test_special_bytes_are_escaped_and_run_lengths_expanded() -> None:
    data = b"a#b$c}d*e"
    packet = frame(data)
    assert b"#" not in packet[1:-3] and b"$" not in packet[1:]
    assert PacketReader().feed(packet) == [("packet", data)]
    assert unescape(b"0* ") == b"0000"  # '*' + (' ' = 32): 3 more


def test_a_bad_checksum_is_reported_not_answered() -> None:
    assert PacketReader().feed(b"$g#00") == [("bad", b"g")]


def test_a_packet_without_end_is_refused_once_it_is_too_long() -> None:
    reader = PacketReader()
    with pytest.raises(ProtocolError):
        reader.feed(b"$" + b"x" * 0x10000)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("tcp::1234", ("localhost", 1234)),
        ("tcp:localhost:1234", ("localhost", 1234)),
        ("tcp:127.0.0.1:0", ("127.0.0.1", 0)),
        ("tcp:1234", ("localhost", 1234)),
        ("1234", ("localhost", 1234)),
        (":1234", ("localhost", 1234)),
        ("tcp:[::1]:9", ("::1", 9)),
    ],
)
def test_gdb_addresses(text: str, address: tuple[str, int]) -> None:
    assert parse_gdb_address(text) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [("tcp:x", "the port must be a number"), ("unix:/x", "is not tcp:HOST:PORT"), ("tcp::70000", "out of range")],
)
def test_bad_gdb_addresses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_gdb_address(text)


def _registers(xml: str) -> tuple[str, list[tuple[str, int]]]:
    root = ET.fromstring(xml.split("\n", 2)[2])  # past the declarations
    arch = root.findtext("architecture") or ""
    regs = [(reg.get("name") or "", int(reg.get("bitsize") or 0)) for reg in root.iter("reg")]
    return arch, regs


def test_x86_64_description_is_gdbs_amd64_layout() -> None:
    arch, regs = _registers(X86_64_XML)
    assert arch == "i386:x86-64"
    names = [name for name, _ in regs]
    # gdb's amd64 numbering: the core registers in this order, then SSE.
    assert names[:24] == [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        *(f"r{n}" for n in range(8, 16)), "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
    ]  # fmt: skip
    assert names[24:32] == [f"st{n}" for n in range(8)]
    assert names[40:57] == [*(f"xmm{n}" for n in range(16)), "mxcsr"]
    assert {"fs_base", "gs_base", "cr3", "efer"} <= set(names)
    assert [bits for name, bits in regs if name in ("rip", "eflags", "st0", "xmm0")] == [64, 32, 80, 128]
    assert names == [reg.name for reg in X86Registers().regs]


def test_aarch64_description_is_the_core_feature() -> None:
    arch, regs = _registers(AARCH64_XML)
    assert arch == "aarch64"
    assert [name for name, _ in regs] == [*(f"x{n}" for n in range(31)), "sp", "pc", "cpsr"]
    assert regs[-1] == ("cpsr", 32)
    assert [name for name, _ in regs] == [reg.name for reg in Aarch64Registers().regs]


def test_g_packet_splits_into_registers() -> None:
    registers = Aarch64Registers()
    data = b"".join(struct.pack("<Q", n) for n in range(33)) + struct.pack("<I", 0x3C5)
    values = registers.split(data)
    assert len(values) == 34 and values[32] == struct.pack("<Q", 32) and values[33] == struct.pack("<I", 0x3C5)


# --- x86 page walks -----------------------------------------------------------------------


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory()
    region = mem.allocate(MemoryRegionSpec(guest_phys_addr=0, size=4 << 20))
    mem.insert(region)
    return mem


def test_no_paging_is_physical(memory: GuestMemory) -> None:
    assert x86_translate(memory, 0x1234, cr0=0, cr3=0, cr4=0, efer=0) == (0x1234, 0x1000 - 0x234)


def test_four_level_paging_with_4k_and_2m_pages(memory: GuestMemory) -> None:
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    memory.write_u64(pml4 + 8 * 0, pdpt | 3)
    memory.write_u64(pdpt + 8 * 0, pd | 3)
    memory.write_u64(pd + 8 * 1, 0x20_0000 | 0x83)  # 2 MiB page for 0x200000..0x3fffff -> 0x200000
    memory.write_u64(pd + 8 * 0, pt | 3)
    memory.write_u64(pt + 8 * 5, 0x7000 | 3)  # 0x5000 -> 0x7000
    regs = {"cr0": CR0_PG | 1, "cr3": pml4, "cr4": CR4_PAE, "efer": EFER_LMA}
    assert x86_translate(memory, 0x5123, **regs) == (0x7123, 0x1000 - 0x123)
    assert x86_translate(memory, 0x20_1000, **regs) == (0x20_1000, 0x20_0000 - 0x1000)
    with pytest.raises(TranslationError, match="not mapped"):
        x86_translate(memory, 0x6000, **regs)
    with pytest.raises(TranslationError, match="not mapped"):
        x86_translate(memory, 1 << 39, **regs)


def test_a_table_outside_ram_is_an_error_not_a_host_read(memory: GuestMemory) -> None:
    memory.write_u64(0x1000, 0x4000_0000 | 3)  # the PDPT "is" beyond RAM
    with pytest.raises(TranslationError, match="outside guest RAM"):
        x86_translate(memory, 0, cr0=CR0_PG, cr3=0x1000, cr4=CR4_PAE, efer=EFER_LMA)


def test_32_bit_paging_with_a_4m_page(memory: GuestMemory) -> None:
    memory.write_u32(0x1000 + 4 * 1, 0x0000_0000 | 0x83)  # 4 MiB page: 0x400000.. -> 0
    memory.write_u32(0x1000 + 4 * 0, 0x2000 | 3)
    memory.write_u32(0x2000 + 4 * 3, 0x9000 | 3)
    assert x86_translate(memory, 0x3010, cr0=CR0_PG, cr3=0x1000, cr4=0x10, efer=0) == (0x9010, 0xFF0)
    assert x86_translate(memory, 0x40_0010, cr0=CR0_PG, cr3=0x1000, cr4=0x10, efer=0)[0] == 0x10
