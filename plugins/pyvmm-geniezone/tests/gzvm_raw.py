"""Calls straight through the seam for the tests that break the driver's rules
on purpose.  Structs are packed here with ``struct`` from the layouts in
``docs/backends/geniezone.md`` §3 -- not with the plugin's bindings -- so a
negative test exercises the model, not the plugin."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field

from pyvmm_geniezone import model as gm

PAGE = mmap.PAGESIZE


@dataclass
class Gzvm:
    """``/dev/gzvm`` and one VM on a model, driven by hand.  Every struct handed
    to the driver stays alive in :attr:`keep` until the test ends."""

    model: gm.GenieZoneModel
    dev: int
    vm: int
    keep: list[object] = field(default_factory=list)

    @classmethod
    def open(cls, model: gm.GenieZoneModel) -> Gzvm:
        dev = model.open("/dev/gzvm", os.O_RDWR)
        assert dev >= 0
        vm = model.ioctl(dev, gm.GZVM_CREATE_VM, 0)
        assert vm >= 0
        return cls(model, dev, vm)

    def pointer(self, data: bytes) -> int:
        """The address of a fresh copy of ``data`` (kept alive)."""
        buf = ctypes.create_string_buffer(data, len(data))
        self.keep.append(buf)
        return ctypes.addressof(buf)

    def call(self, request: int, data: bytes | int = 0, fd: int | None = None) -> int:
        """``ioctl(fd or the VM fd, request, data)``; bytes are passed by address."""
        arg = self.pointer(data) if isinstance(data, bytes) else data
        return self.model.ioctl(self.vm if fd is None else fd, request, arg)

    def mapping(self, size: int) -> int:
        """The address of a fresh anonymous mapping of ``size`` bytes."""
        area = mmap.mmap(-1, size)
        self.keep.append(area)
        anchor = ctypes.c_char.from_buffer(area)
        address = ctypes.addressof(anchor)
        del anchor
        return address

    def own_vma(self, size: int) -> int:
        """A mapping that is its own VMA: guard pages around it with no access."""
        area = mmap.mmap(-1, size + 2 * PAGE)
        self.keep.append(area)
        anchor = ctypes.c_char.from_buffer(area)
        base = ctypes.addressof(anchor)
        del anchor
        libc = ctypes.CDLL(None)
        assert libc.mprotect(ctypes.c_void_p(base), PAGE, 0) == 0
        assert libc.mprotect(ctypes.c_void_p(base + PAGE + size), PAGE, 0) == 0
        return base + PAGE

    def region(self, slot: int, gpa: int, size: int, uva: int, flags: int = gm.MEM_GUEST) -> int:
        return self.call(gm.GZVM_SET_USER_MEMORY_REGION, gm.MEM_REGION.pack(slot, flags, gpa, size, uva))

    def vcpu(self, index: int = 0) -> int:
        return self.call(gm.GZVM_CREATE_VCPU, index)

    def irqfd(self, fd: int, gsi: int, flags: int = 0, pad: bytes = bytes(16), resamplefd: int = 0) -> int:
        return self.call(gm.GZVM_IRQFD, gm.IRQFD.pack(fd, gsi, flags, resamplefd, pad))

    def ioeventfd(self, fd: int, addr: int, length: int, flags: int = 0, datamatch: int = 0) -> int:
        return self.call(gm.GZVM_IOEVENTFD, gm.IOEVENTFD.pack(datamatch, addr, length, fd, flags, bytes(36)))

    def enable_cap(self, cap: int, *args: int) -> int:
        return self.call(gm.GZVM_ENABLE_CAP, gm.ENABLE_CAP.pack(cap, *args, *[0] * (5 - len(args))))

    def create_device(self, dev_type: int, addr: int, size: int, attr_addr: int = 0, attr_size: int = 0) -> int:
        return self.call(gm.GZVM_CREATE_DEVICE, gm.CREATE_DEVICE.pack(dev_type, 0, 0, addr, size, attr_addr, attr_size))

    def set_reg(self, vcpu: int, reg_id: int, value: int) -> int:
        value_at = self.pointer(struct.pack("<Q", value))
        return self.call(gm.GZVM_SET_ONE_REG, gm.ONE_REG.pack(reg_id, value_at), fd=vcpu)
