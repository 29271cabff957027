"""Raw calls through the seam, for tests that break the interface's rules on
purpose.  The structs are packed here with ``struct`` from the layouts in
``docs/backends/gunyah.md`` §4, not with the plugin's bindings, so a
negative test exercises the model and not the plugin."""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyvmm.machine.devicetree import GIC_SPI, IRQ_TYPE_LEVEL_HIGH, PHANDLE_GIC, DeviceTree
from pyvmm.machine.virt import (
    GIC_DISTRIBUTOR_BASE,
    GIC_DISTRIBUTOR_SIZE,
    GIC_REDISTRIBUTOR_BASE,
    GIC_REDISTRIBUTOR_SIZE,
)
from pyvmm_gunyah import model as gm

PAGE = 4096


def buffer(data: bytes) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(data, len(data))


def address(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


@dataclass
class RawVm:
    """A VM driven by hand: a device fd, a VM fd, and the buffers keeping the
    structs the driver reads alive."""

    model: gm.GunyahModel
    dev: int
    fd: int
    keep: list[object] = field(default_factory=list)
    #: The host memory of the region :meth:`startable` made.
    host_ram: int = 0

    @classmethod
    def create(cls, model: gm.GunyahModel) -> RawVm:
        dev = model.open("/dev/gunyah", 0)
        assert dev >= 0
        fd = model.ioctl(dev, gm.GH_CREATE_VM, 0)
        assert fd >= 0
        return cls(model, dev, fd)

    def ioctl(self, request: int, data: bytes | int = 0, fd: int | None = None) -> int:
        if isinstance(data, bytes):
            buf = buffer(data)
            self.keep.append(buf)
            arg = address(buf)
        else:
            arg = data
        return self.model.ioctl(self.fd if fd is None else fd, request, arg)

    def ram(self, size: int = 16 * PAGE) -> int:
        """Host memory for a region: the address of a fresh anonymous mapping."""
        mapping = mmap.mmap(-1, size)
        self.keep.append(mapping)
        anchor = ctypes.c_char.from_buffer(mapping)
        addr = ctypes.addressof(anchor)
        del anchor
        return addr

    def region(self, label: int, gpa: int, size: int = 16 * PAGE, flags: int = 7, host: int | None = None) -> int:
        host = self.ram(max(size, PAGE)) if host is None else host
        return self.ioctl(gm.GH_VM_SET_USER_MEM_REGION, gm.MEM_REGION.pack(label, flags, gpa, size, host))

    def fn(self, request: int, fn_type: int, arg: bytes, arg_size: int | None = None) -> int:
        argbuf = buffer(arg)
        self.keep.append(argbuf)
        size = len(arg) if arg_size is None else arg_size
        return self.ioctl(request, gm.FN_DESC.pack(fn_type, size, address(argbuf)))

    def add_vcpu(self, vcpu_id: int = 0) -> int:
        return self.fn(gm.GH_VM_ADD_FUNCTION, gm.FN_VCPU_TYPE, gm.FN_VCPU.pack(vcpu_id))

    def dtb(self, gpa: int, size: int = PAGE) -> int:
        return self.ioctl(gm.GH_VM_SET_DTB_CONFIG, gm.RANGE.pack(gpa, size))

    def boot(self, reg: int, value: int) -> int:
        return self.ioctl(gm.GH_VM_SET_BOOT_CONTEXT, gm.BOOT_CONTEXT.pack(reg, 0, value))

    def startable(
        self, gpa: int = 0x8000_0000, code: bytes = b"", *, tree: bytes | None = None, lend: bool = False
    ) -> int:
        """Memory (holding ``code`` at its start, ``tree`` -- by default one vCPU
        and no doorbell -- at 8 pages in), a DTB config and vCPU 0: enough for
        START.  Returns the vCPU fd."""
        host = self.ram(16 * PAGE)
        write_guest(host, 0, code)
        write_guest(host, 8 * PAGE, raw_fdt() if tree is None else tree)
        request = gm.GH_VM_ANDROID_LEND_USER_MEM if lend else gm.GH_VM_SET_USER_MEM_REGION
        assert self.ioctl(request, gm.MEM_REGION.pack(0, 7, gpa, 16 * PAGE, host)) == 0
        self.host_ram = host
        assert self.dtb(gpa + 8 * PAGE) == 0
        vcpu = self.add_vcpu(0)
        assert vcpu >= 0
        return vcpu

    def start(self) -> int:
        return self.ioctl(gm.GH_VM_START)

    def irqfd(self, fd: int, label: int, flags: int = 0) -> int:
        return self.fn(gm.GH_VM_ADD_FUNCTION, gm.FN_IRQFD_TYPE, gm.FN_IRQFD.pack(fd, label, flags, 0))

    def ioeventfd(
        self, fd: int, addr: int, length: int = 4, flags: int = 0, data: int = 0, remove: bool = False
    ) -> int:
        request = gm.GH_VM_REMOVE_FUNCTION if remove else gm.GH_VM_ADD_FUNCTION
        return self.fn(request, gm.FN_IOEVENTFD_TYPE, gm.FN_IOEVENTFD.pack(data, addr, length, fd, flags, 0))

    def close(self) -> None:
        self.model.close_all()


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


@dataclass
class RawVcpu:
    """A vCPU fd with its run page mapped, read with the §4.4 offsets."""

    vm: RawVm
    fd: int
    page: mmap.mmap

    @classmethod
    def of(cls, vm: RawVm, fd: int) -> RawVcpu:
        page = vm.model.mmap(fd, PAGE, 0)
        vm.keep.append(page)
        return cls(vm, fd, page)

    def run(self) -> int:
        return self.vm.model.ioctl(self.fd, gm.GH_VCPU_RUN, 0)

    @property
    def exit_reason(self) -> int:
        return int(struct.unpack_from("<I", self.page, gm.RUN_EXIT_REASON)[0])

    def mmio(self) -> tuple[int, int, bool, bytes]:
        """(phys_addr, len, is_write, data[:len]) of an MMIO exit."""
        (phys,) = struct.unpack_from("<Q", self.page, gm.RUN_MMIO_PHYS)
        (length,) = struct.unpack_from("<I", self.page, gm.RUN_MMIO_LEN)
        is_write = bool(self.page[gm.RUN_MMIO_IS_WRITE])
        return phys, length, is_write, bytes(self.page[gm.RUN_MMIO_DATA : gm.RUN_MMIO_DATA + length])

    def status(self) -> tuple[int, int]:
        """(status, exit_info.type) of a STATUS exit."""
        (status,) = struct.unpack_from("<I", self.page, gm.RUN_STATUS)
        (exit_type,) = struct.unpack_from("<H", self.page, gm.RUN_EXIT_INFO)
        return status, exit_type

    def complete_read(self, data: bytes, resume_action: int = gm.RESUME_HANDLED) -> None:
        self.page[gm.RUN_MMIO_DATA : gm.RUN_MMIO_DATA + len(data)] = data
        self.page[gm.RUN_MMIO_RESUME] = resume_action


def write_guest(host_addr: int, offset: int, code: bytes) -> None:
    """Put ``code`` into guest memory through its host mapping (the region is shared)."""
    ctypes.memmove(host_addr + offset, code, len(code))


def raw_fdt(vcpus: int = 1, doorbells: Iterable[int] = (), *, vm_config: bool = True, gic: bool = False) -> bytes:
    """A device tree as the resource manager reads it (docs/backends/gunyah.md
    §7.3), written by hand rather than by the plugin: ``vcpus`` CPU nodes and a
    doorbell vdevice per label; with ``gic``, a GICv3 node at the virt board's
    addresses that ``interrupts { config }`` names, each doorbell on SPI = label."""
    tree = DeviceTree()
    tree.u32("/cpus", "#address-cells", 1)
    tree.u32("/cpus", "#size-cells", 0)
    for index in range(vcpus):
        tree.string(f"/cpus/cpu@{index:x}", "device_type", "cpu")
        tree.string(f"/cpus/cpu@{index:x}", "enable-method", "psci")
        tree.u32(f"/cpus/cpu@{index:x}", "reg", index)
    if vm_config:
        tree.string("/gunyah-vm-config/vcpus", "affinity", "proxy")
        tree.string("/gunyah-vm-config/vdevices", "generate", "/hypervisor")
        for label in doorbells:
            node = f"/gunyah-vm-config/vdevices/bell-{label:x}"
            tree.string(node, "vdevice-type", "doorbell")
            tree.u32(node, "label", label)
            if gic:
                tree.u32(node, "interrupts", GIC_SPI, label, IRQ_TYPE_LEVEL_HIGH)
        if gic:
            tree.u32("/gunyah-vm-config/interrupts", "config", PHANDLE_GIC)
    if gic:
        intc = f"/intc@{GIC_DISTRIBUTOR_BASE:x}"
        tree.string(intc, "compatible", "arm,gic-v3")
        redistributors = GIC_REDISTRIBUTOR_SIZE * vcpus
        tree.u64(intc, "reg", GIC_DISTRIBUTOR_BASE, GIC_DISTRIBUTOR_SIZE, GIC_REDISTRIBUTOR_BASE, redistributors)
        tree.u32(intc, "phandle", PHANDLE_GIC)
    return tree.to_dtb()
