"""The emulator a VMM completes before-the-instruction exits with
(:mod:`pyvmm.softcpu.x86_emulate`): decoding, addresses, register writes."""

from __future__ import annotations

import pytest

from pyvmm.arch.x86_64 import Regs
from pyvmm.exits import IoExit, MmioExit
from pyvmm.softcpu import x86_emulate as xe

# (bytes, GNU as source, length, operand size)
DECODED = [
    ("8b03", "mov eax, [rbx]", 2, 4),
    ("48894310", "mov [rbx+0x10], rax", 4, 8),
    ("668b0e", "mov cx, [rsi]", 3, 2),
    ("8a6701", "mov ah, [rdi+1]", 3, 1),
    ("448a4701", "mov r8b, [rdi+1]", 4, 1),
    ("c643015a", "mov byte ptr [rbx+1], 0x5a", 4, 1),
    ("48c7042588776655ffffffff", "mov qword ptr [0x55667788], -1", 12, 8),
    ("8b0510000000", "mov eax, [rip+0x10]", 6, 4),
    ("428b4c8804", "mov ecx, [rax+r9*4+4]", 5, 4),
    ("0fb75302", "movzx edx, word ptr [rbx+2]", 4, 2),
    ("48a1efcdab8967452301", "movabs rax, [0x0123456789abcdef]", 10, 8),
    ("64890c2500010000", "mov fs:[0x100], ecx", 8, 4),
    ("e410", "in al, 0x10", 2, 1),
    ("66ed", "in ax, dx", 2, 2),
    ("ef", "out dx, eax", 1, 4),
]


@pytest.mark.parametrize(("code", "source", "length", "size"), DECODED, ids=[d[1] for d in DECODED])
def test_decode(code: str, source: str, length: int, size: int) -> None:
    insn = xe.decode(bytes.fromhex(code) + b"\x90" * 4)
    assert (insn.length, insn.operand_size) == (length, size)


def test_decoded_bytes_match_their_source() -> None:
    from pyvmm.testing.conformance.programs import assemble_x86

    for code, source, _, _ in DECODED:
        built = assemble_x86(source)
        if built is None:
            pytest.skip("no GNU as here")
        assert built.hex() == code, source


def test_effective_addresses() -> None:
    regs = Regs(rax=0x1000, rbx=0x2000, r9=3, rip=0x5000)
    assert xe.effective_address(xe.decode(bytes.fromhex("428b4c8804")), regs) == 0x1000 + 12 + 4
    assert xe.effective_address(xe.decode(bytes.fromhex("8b0510000000")), regs) == 0x5000 + 6 + 0x10
    fs = xe.decode(bytes.fromhex("64890c2500010000"))
    assert xe.effective_address(fs, regs, {"fs": 0x7000}) == 0x7100


def _mmio(code: str, size: int, is_write: bool, data: bytes = b"") -> MmioExit:
    exit_ = MmioExit()
    exit_.instruction = bytes.fromhex(code)
    exit_.size = size
    exit_.is_write = is_write
    exit_.data = memoryview(bytearray(data.ljust(size, b"\0")))
    return exit_


def test_reads_write_the_destination_like_the_cpu() -> None:
    regs = Regs(rax=0xFFFFFFFFFFFFFFFF, rcx=0x1111111111111111, rdx=-1 & (2**64 - 1), r8=0, rip=0x100)
    after = xe.complete_mmio(regs, _mmio("8b03", 4, False, b"\x01\x02\x03\x04"))
    assert (after.rax, after.rip) == (0x04030201, 0x102)  # a 32-bit load clears the top
    after = xe.complete_mmio(regs, _mmio("668b0e", 2, False, b"\xaa\xbb"))
    assert after.rcx == 0x111111111111BBAA
    after = xe.complete_mmio(regs, _mmio("8a6701", 1, False, b"\x5a"))
    assert after.rax == 0xFFFFFFFFFFFF5AFF  # AH
    after = xe.complete_mmio(regs, _mmio("448a4701", 1, False, b"\x5a"))
    assert after.r8 == 0x5A
    after = xe.complete_mmio(regs, _mmio("0fb75302", 2, False, b"\xef\xbe"))
    assert after.rdx == 0xBEEF
    assert regs.rip == 0x100  # the input is not changed


def test_writes_advance_rip_and_mismatches_are_refused() -> None:
    regs = Regs(rax=0x55, rip=0x100)
    assert xe.complete_mmio(regs, _mmio("48894310", 8, True)).rip == 0x104
    assert xe.write_value(xe.decode(bytes.fromhex("c643015a")), regs) == 0x5A
    with pytest.raises(xe.NotEmulated):
        xe.complete_mmio(regs, _mmio("48894310", 4, True))  # the exit says 4 bytes, the mov moves 8
    with pytest.raises(xe.NotEmulated):
        xe.complete_mmio(regs, _mmio("0103", 4, False))  # add [rbx], eax
    with pytest.raises(xe.NotEmulated):
        xe.complete_mmio(regs, _mmio("", 4, False))  # an after-the-access exit


def test_port_io() -> None:
    exit_ = IoExit()
    exit_.instruction, exit_.port, exit_.size, exit_.count, exit_.is_write = bytes.fromhex("e410"), 0x10, 1, 1, False
    exit_.data = memoryview(bytearray(b"\x99"))
    after = xe.complete_io(Regs(rax=0x1234, rip=0x10), exit_)
    assert (after.rax, after.rip) == (0x1299, 0x12)
    exit_.instruction, exit_.port, exit_.size, exit_.is_write = bytes.fromhex("ef"), 0x3F8, 4, True
    assert xe.complete_io(Regs(rdx=0x3F8, rip=0x10), exit_).rip == 0x11
    with pytest.raises(xe.NotEmulated):
        xe.complete_io(Regs(rdx=0x3F9, rip=0x10), exit_)  # the port in DX is not the exit's


def test_before_timing_is_x86_only() -> None:
    pytest.importorskip("unicorn")
    from pyvmm.errors import ConfigError
    from pyvmm.softcpu import SoftCpu

    with pytest.raises(ConfigError):
        SoftCpu("aarch64", exit_timing="before")
    with pytest.raises(ConfigError):
        SoftCpu("x86_64", exit_timing="during")
