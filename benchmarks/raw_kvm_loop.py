"""The "raw Python" baseline: KVM exit loops with nothing but the standard library.

Same guest, same VM shape and same checks as ``benchmarks/c/kvm_loop.c``, but
driven from a plain Python loop over ``fcntl.ioctl`` and an ``mmap`` of the
vCPU's ``kvm_run`` page.  Comparing pyvmm against this separates the cost of
the framework from the cost of being in Python at all, so this file must not
import pyvmm or pyvmm_kvm: it carries its own ioctl numbers and struct offsets
(x86_64 <linux/kvm.h>).

    python benchmarks/raw_kvm_loop.py [N]
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import sys
import time

# --- guest code: the single source of the guest bytes in this file ----------
# 16-bit real mode, loaded at CS:IP = 0000:1000, with DX = 0x10, BX = 0,
# DS = 0x1000 (base 0x10000, the first byte past guest RAM).
#
#   pio:   1000: ee        loop: out dx, al      ; KVM_EXIT_IO, port 0x10, 1 byte
#          1001: eb fd           jmp loop
#   mmio:  1000: 88 07     loop: mov [bx], al    ; KVM_EXIT_MMIO, write gpa 0x10000
#          1002: eb fc           jmp loop
GUEST_CODE: dict[str, bytes] = {
    "pio": bytes([0xEE, 0xEB, 0xFD]),
    "mmio": bytes([0x88, 0x07, 0xEB, 0xFC]),
}

RAM_SIZE = 0x10000
# The real-mode TSS's 3 pages, where pyvmm-kvm and kvm_loop.c put them: KVM needs
# the address on Intel hosts without unrestricted guest (api.rst), so all three
# loops set it and the VM create + destroy figure compares the same ioctls.
TSS_ADDR = 0xFFFBD000
CODE_GPA = 0x1000
PIO_PORT = 0x10
MMIO_DS_SELECTOR = 0x1000
MMIO_GPA = MMIO_DS_SELECTOR << 4
WARMUP = 16  # first entries fault pages in; keep them out of the timing, as the C loop does

# --- ioctl numbers (asm-generic/ioctl.h encoding, KVMIO = 0xAE) -------------
_KVMIO = 0xAE
_SIZEOF_USERSPACE_MEMORY_REGION = 32
_SIZEOF_REGS = 144
_SIZEOF_SREGS = 312


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_KVMIO << 8) | nr


KVM_GET_API_VERSION = _ioc(0, 0x00, 0)
KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_SET_TSS_ADDR = _ioc(0, 0x47, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(0, 0x04, 0)
KVM_CREATE_VCPU = _ioc(0, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(1, 0x46, _SIZEOF_USERSPACE_MEMORY_REGION)
KVM_RUN = _ioc(0, 0x80, 0)
KVM_GET_REGS = _ioc(2, 0x81, _SIZEOF_REGS)
KVM_SET_REGS = _ioc(1, 0x82, _SIZEOF_REGS)
KVM_GET_SREGS = _ioc(2, 0x83, _SIZEOF_SREGS)
KVM_SET_SREGS = _ioc(1, 0x84, _SIZEOF_SREGS)

KVM_EXIT_IO = 2
KVM_EXIT_MMIO = 6
KVM_EXIT_IO_OUT = 1

# fcntl.ioctl passes an integer argument as a C int, which the TSS address does
# not fit: libc's ioctl through ctypes, with the unsigned long the kernel takes.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc.ioctl.restype = ctypes.c_int


def _ioctl_value(fd: int, request: int, value: int) -> None:
    if _libc.ioctl(fd, request, value) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")


# --- struct layouts ---------------------------------------------------------
# kvm_userspace_memory_region: slot, flags, guest_phys_addr, memory_size, userspace_addr
_MEMORY_REGION = struct.Struct("=IIQQQ")
# kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
_REGS = struct.Struct("=18Q")
# kvm_segment inside kvm_sregs (cs at 0, ds at 24): base u64, limit u32, selector u16, ...
_SEG_BASE_LIMIT_SELECTOR = struct.Struct("=QIH")
_SREGS_CS = 0
_SREGS_DS = 24
# kvm_run, read from exit_reason (offset 8) through the exit union (offset 32)
# in one unpack so the hot loop does a single call per exit.
_RUN_IO = struct.Struct("=I20xBBHIQ")  # exit_reason, io.direction, io.size, io.port, io.count, io.data_offset
_RUN_MMIO = struct.Struct("=I20xQ8sIB")  # exit_reason, mmio.phys_addr, mmio.data, mmio.len, mmio.is_write
_RUN_EXIT_REASON_OFFSET = 8


class _Vm:
    """A minimal VM: one 64 KiB RAM slot at GPA 0 and one vCPU with its run page."""

    def __init__(self, kvm_fd: int, run_size: int) -> None:
        self.vm_fd = fcntl.ioctl(kvm_fd, KVM_CREATE_VM, 0)
        _ioctl_value(self.vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR)
        self.ram = mmap.mmap(-1, RAM_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # ctypes is the stdlib's only way to learn an mmap's address; the view
        # pins the buffer, so it is dropped before the mmap is closed.
        ram_view = ctypes.c_char.from_buffer(self.ram)
        region = _MEMORY_REGION.pack(0, 0, 0, RAM_SIZE, ctypes.addressof(ram_view))
        del ram_view
        fcntl.ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, region)
        self.vcpu_fd = fcntl.ioctl(self.vm_fd, KVM_CREATE_VCPU, 0)
        self.run = mmap.mmap(self.vcpu_fd, run_size, flags=mmap.MAP_SHARED)

    def close(self) -> None:
        self.run.close()
        os.close(self.vcpu_fd)
        os.close(self.vm_fd)
        self.ram.close()

    def load_real_mode(self, code: bytes) -> None:
        self.ram[CODE_GPA : CODE_GPA + len(code)] = code

        sregs = bytearray(_SIZEOF_SREGS)
        fcntl.ioctl(self.vcpu_fd, KVM_GET_SREGS, sregs, True)
        # Reset state has CS = f000 with base ffff0000; flatten it so IP is a GPA.
        _, cs_limit, _ = _SEG_BASE_LIMIT_SELECTOR.unpack_from(sregs, _SREGS_CS)
        _SEG_BASE_LIMIT_SELECTOR.pack_into(sregs, _SREGS_CS, 0, cs_limit, 0)
        _, ds_limit, _ = _SEG_BASE_LIMIT_SELECTOR.unpack_from(sregs, _SREGS_DS)
        _SEG_BASE_LIMIT_SELECTOR.pack_into(sregs, _SREGS_DS, MMIO_GPA, ds_limit, MMIO_DS_SELECTOR)
        fcntl.ioctl(self.vcpu_fd, KVM_SET_SREGS, bytes(sregs))

        regs = [0] * 18
        regs[0] = 0x5A  # rax: the byte written
        regs[3] = PIO_PORT  # rdx
        regs[16] = CODE_GPA  # rip
        regs[17] = 0x2  # rflags: bit 1 reads as one; IF clear so nothing interrupts the loop
        fcntl.ioctl(self.vcpu_fd, KVM_SET_REGS, _REGS.pack(*regs))


def _open_kvm() -> tuple[int, int]:
    kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    api = fcntl.ioctl(kvm_fd, KVM_GET_API_VERSION, 0)
    if api != 12:
        os.close(kvm_fd)
        raise RuntimeError(f"KVM API version {api}, expected 12")
    return kvm_fd, fcntl.ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0)


def _bad_exit(run: mmap.mmap, expected: str) -> RuntimeError:
    (reason,) = struct.unpack_from("=I", run, _RUN_EXIT_REASON_OFFSET)
    return RuntimeError(f"expected {expected} exit, got exit_reason={reason}")


def _spin_pio(vcpu_fd: int, run: mmap.mmap, count: int) -> int:
    # Globals and attributes bound to locals: this is the loop someone writing
    # a VMM without a framework would write, not a deliberately slow one.
    ioctl, unpack, kvm_run = fcntl.ioctl, _RUN_IO.unpack_from, KVM_RUN
    t0 = time.perf_counter_ns()
    for _ in range(count):
        ioctl(vcpu_fd, kvm_run, 0)
        reason, direction, size, port, _count, _data_offset = unpack(run, _RUN_EXIT_REASON_OFFSET)
        if reason != KVM_EXIT_IO or direction != KVM_EXIT_IO_OUT or port != PIO_PORT or size != 1:
            raise _bad_exit(run, "PIO out to port 0x10")
    return time.perf_counter_ns() - t0


def _spin_mmio(vcpu_fd: int, run: mmap.mmap, count: int) -> int:
    ioctl, unpack, kvm_run = fcntl.ioctl, _RUN_MMIO.unpack_from, KVM_RUN
    t0 = time.perf_counter_ns()
    for _ in range(count):
        ioctl(vcpu_fd, kvm_run, 0)
        reason, gpa, _data, length, is_write = unpack(run, _RUN_EXIT_REASON_OFFSET)
        if reason != KVM_EXIT_MMIO or not is_write or gpa != MMIO_GPA or length != 1:
            raise _bad_exit(run, "MMIO write to 0x10000")
    return time.perf_counter_ns() - t0


def _exit_loop(kind: str, n: int) -> float:
    if n <= 0:
        raise ValueError("n must be positive")
    spin = _spin_pio if kind == "pio" else _spin_mmio
    kvm_fd, run_size = _open_kvm()
    try:
        vm = _Vm(kvm_fd, run_size)
        try:
            vm.load_real_mode(GUEST_CODE[kind])
            spin(vm.vcpu_fd, vm.run, WARMUP)
            elapsed = spin(vm.vcpu_fd, vm.run, n)
        finally:
            vm.close()
    finally:
        os.close(kvm_fd)
    return elapsed / n


def pio_loop(n: int) -> float:
    """Run ``n`` port-I/O exits; return nanoseconds per exit."""
    return _exit_loop("pio", n)


def mmio_loop(n: int) -> float:
    """Run ``n`` MMIO-write exits; return nanoseconds per exit."""
    return _exit_loop("mmio", n)


def create_loop(n: int) -> float:
    """Create and tear down ``n`` minimal VMs; return nanoseconds per VM."""
    times = create_times(n)
    return sum(times) / len(times)


def create_times(n: int) -> list[int]:
    """Create and tear down ``n`` minimal VMs; return each one's nanoseconds."""
    if n <= 0:
        raise ValueError("n must be positive")
    kvm_fd, run_size = _open_kvm()
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            _Vm(kvm_fd, run_size).close()
            times.append(time.perf_counter_ns() - t0)
    finally:
        os.close(kvm_fd)
    return times


def main(argv: list[str]) -> int:
    n = int(argv[1]) if len(argv) > 1 else 20000
    print(f"pio_ns_per_exit={pio_loop(n):.1f}")
    print(f"mmio_ns_per_exit={mmio_loop(n):.1f}")
    print(f"create_ns_per_vm={create_loop(max(1, n // 100)):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
