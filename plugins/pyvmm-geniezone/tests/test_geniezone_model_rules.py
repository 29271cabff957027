"""One negative test per rule of the GenieZone driver model: a call that breaks
the rule gets the driver's errno, and the model names the rule it broke.  Each
test starts from a call the driver accepts, so the refusal is the rule's alone."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterator

import pytest
from gzvm_raw import PAGE, Gzvm

from pyvmm.arch.aarch64 import PC_ID
from pyvmm.testing.driver_model import EFAULT_RULE, NO_MMAP, NO_SUCH_IOCTL, ModelGap, Rule
from pyvmm_geniezone import model as gm


@pytest.fixture
def gz(model: gm.GenieZoneModel) -> Iterator[Gzvm]:
    raw = Gzvm.open(model)
    yield raw
    model.close_all()


def refused(model: gm.GenieZoneModel, result: int, rule: Rule) -> None:
    """``result`` is the rule's errno and the model recorded that rule."""
    assert result == -rule.errno, (result, rule)
    last = model.last_rejection
    assert last is not None and last.rule is rule, last
    model.rejections.clear()


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


# --- /dev/gzvm ---------------------------------------------------------------------
def test_check_extension_on_the_device_needs_a_pointer(gz: Gzvm) -> None:
    assert gz.call(gm.GZVM_CHECK_EXTENSION, struct.pack("<Q", gm.CAP_VM_GPA_SIZE), fd=gz.dev) == 0
    refused(gz.model, gz.call(gm.GZVM_CHECK_EXTENSION, 0, fd=gz.dev), gm.R_CHECK_EXTENSION_NULL)


def test_check_extension_answers_through_the_pointer(gz: Gzvm) -> None:
    cell = gz.pointer(struct.pack("<Q", gm.CAP_PROTECTED_VM))
    assert gz.model.ioctl(gz.vm, gm.GZVM_CHECK_EXTENSION, cell) == 0
    assert struct.unpack("<Q", (ctypes_bytes(cell, 8)))[0] == 1
    assert gz.call(gm.GZVM_CHECK_EXTENSION, struct.pack("<Q", 0x1234)) == -errno.EOPNOTSUPP
    assert gz.model.rejections == [], "an unknown capability is a normal 'no'"


def ctypes_bytes(address: int, size: int) -> bytes:
    return ctypes.string_at(address, size)


# --- memory ------------------------------------------------------------------------
def test_slot_numbers_stop_at_nine(gz: Gzvm) -> None:
    assert gz.region(9, 0x4000_0000, PAGE, gz.own_vma(PAGE)) == 0
    refused(gz.model, gz.region(10, 0x5000_0000, PAGE, gz.own_vma(PAGE)), gm.R_MEM_SLOT)


@pytest.mark.parametrize(("gpa", "size"), [(0x4000_0800, PAGE), (0x4000_0000, PAGE + 0x800)])
def test_slot_must_be_page_aligned(gz: Gzvm, gpa: int, size: int) -> None:
    refused(gz.model, gz.region(0, gpa, size, gz.own_vma(2 * PAGE)), gm.R_MEM_ALIGN)


def test_slot_alignment_is_the_host_kernels_page(gz: Gzvm, monkeypatch: pytest.MonkeyPatch) -> None:
    """``PAGE_ALIGNED`` is the kernel's page: on a 16 KiB kernel, 4 KiB is not enough."""
    monkeypatch.setattr(gm, "HOST_PAGE", 16384)
    refused(gz.model, gz.region(0, 0x4000_1000, 0x4000, gz.own_vma(0x4000)), gm.R_MEM_ALIGN)


def test_slot_must_not_wrap(gz: Gzvm) -> None:
    refused(gz.model, gz.region(0, (1 << 64) - PAGE, 2 * PAGE, gz.own_vma(2 * PAGE)), gm.R_MEM_WRAP)


def test_slot_page_count_is_limited(gz: Gzvm) -> None:
    refused(gz.model, gz.region(0, 0, (gm.MEM_MAX_NR_PAGES + 1) * PAGE, gz.own_vma(PAGE)), gm.R_MEM_PAGES)


def test_slot_needs_a_mapping(gz: Gzvm) -> None:
    area = mmap.mmap(-1, PAGE)
    gone = ctypes_address(area)
    area.close()  # unmapped again: no VMA holds the address
    refused(gz.model, gz.region(0, 0x4000_0000, PAGE, gone), gm.R_MEM_NO_VMA)


def ctypes_address(area: mmap.mmap) -> int:
    import ctypes

    anchor = ctypes.c_char.from_buffer(area)
    address = ctypes.addressof(anchor)
    del anchor
    return address


def test_slot_must_be_exactly_its_mapping(gz: Gzvm) -> None:
    uva = gz.own_vma(2 * PAGE)
    refused(gz.model, gz.region(0, 0x4000_0000, PAGE, uva), gm.R_MEM_VMA_SIZE)
    refused(gz.model, gz.region(0, 0x4000_0000, 2 * PAGE, uva + PAGE), gm.R_MEM_PIN)  # runs into the guard page


def test_slot_pages_are_pinned_from_userspace_addr(gz: Gzvm) -> None:
    """Any address inside the mapping is looked up, but the pages pinned are the
    slot's own, ``userspace_addr`` onwards: past the mapping's end they must
    still be mapped writable (``pin_one_page``, FOLL_WRITE)."""
    base = gz.mapping(4 * PAGE)
    libc = ctypes.CDLL(None)
    assert libc.madvise(ctypes.c_void_p(base), 2 * PAGE, 10) == 0  # MADV_DONTFORK: its own VMA
    assert gz.region(0, 0x4000_0000, 2 * PAGE, base + PAGE) == 0, "the next page is writable"
    assert libc.mprotect(ctypes.c_void_p(base + 2 * PAGE), PAGE, mmap.PROT_READ) == 0
    refused(gz.model, gz.region(1, 0x5000_0000, 2 * PAGE, base + PAGE), gm.R_MEM_PIN)


def test_slot_mapping_must_be_writable(gz: Gzvm) -> None:
    uva = gz.own_vma(PAGE)
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(uva), PAGE, mmap.PROT_READ) == 0
    refused(gz.model, gz.region(0, 0x4000_0000, PAGE, uva), gm.R_MEM_PIN)
    vm = gz.model.files[gz.vm]
    assert isinstance(vm, gm.ModelVm) and 0 in vm.slots, "the driver leaves the slot registered"


# --- vCPUs, registers, devices, capabilities --------------------------------------------
def test_vcpu_ids_stop_at_seven(gz: Gzvm) -> None:
    assert gz.vcpu(7) >= 0
    refused(gz.model, gz.vcpu(8), gm.R_VCPU_ID)


def test_vcpu_id_is_the_arguments_low_32_bits(gz: Gzvm) -> None:
    """``gzvm_vm_ioctl_create_vcpu(gzvm, u32 cpuid)`` gets the ioctl's unsigned
    long argument: the high half is dropped before the range check."""
    assert gz.vcpu((1 << 32) + 3) >= 0
    refused(gz.model, gz.vcpu((1 << 32) + 8), gm.R_VCPU_ID)
    vm = gz.model.files[gz.vm]
    assert isinstance(vm, gm.ModelVm) and sorted(vm.vcpus) == [3]


def test_registers_cannot_be_read(gz: Gzvm) -> None:
    vcpu = gz.vcpu(0)
    assert gz.set_reg(vcpu, PC_ID, 0x4008_0000) == 0
    value = gz.pointer(bytes(8))
    refused(gz.model, gz.call(gm.GZVM_GET_ONE_REG, gm.ONE_REG.pack(PC_ID, value), fd=vcpu), gm.R_GET_ONE_REG)


def test_register_size_must_be_one_to_eight_bytes(gz: Gzvm) -> None:
    vcpu = gz.vcpu(0)
    sixteen_bytes = (PC_ID & ~gm.REG_SIZE_MASK) | (4 << gm.REG_SIZE_SHIFT)
    refused(gz.model, gz.set_reg(vcpu, sixteen_bytes, 0), gm.R_ONE_REG_SIZE)


def test_device_attributes_are_at_most_a_page(gz: Gzvm) -> None:
    attributes = gz.pointer(bytes(PAGE + 1))
    assert gz.create_device(gm.DEV_VGIC_V3_DIST, 0x0800_0000, 0x1_0000) == 0
    refused(
        gz.model,
        gz.create_device(gm.DEV_VGIC_V3_REDIST, 0x080A_0000, 0x2_0000, attributes, PAGE + 1),
        gm.R_DEVICE_ATTR_SIZE,
    )


def test_enable_cap_knows_four_capabilities(gz: Gzvm) -> None:
    assert gz.enable_cap(gm.CAP_PROTECTED_VM, gm.PVM_SET_PROTECTED_VM) == 0
    refused(gz.model, gz.enable_cap(0x1234), gm.R_ENABLE_CAP)


@pytest.mark.parametrize("cap", [gm.CAP_ENABLE_DEMAND_PAGING, gm.CAP_BLOCK_BASED_DEMAND_PAGING, gm.CAP_ENABLE_IDLE])
def test_enable_cap_forwards_the_others_to_the_hypervisor(gz: Gzvm, cap: int) -> None:
    """``gzvm_vm_ioctl_arch_enable_cap`` hands these to the hypervisor (not
    EINVAL): its answer is not the model's to make."""
    with pytest.raises(ModelGap, match="the hypervisor's answer"):
        gz.enable_cap(cap)
    assert gz.model.rejections == []


def test_protected_vm_subcommands(gz: Gzvm) -> None:
    refused(gz.model, gz.enable_cap(gm.CAP_PROTECTED_VM, 3), gm.R_PVM_SUBCOMMAND)


# --- irqfds ------------------------------------------------------------------------------
def test_irqfd_pad_must_be_zero(gz: Gzvm) -> None:
    refused(gz.model, gz.irqfd(eventfd(), 1, pad=b"\1" + bytes(15)), gm.R_IRQFD_PAD)


def test_irqfd_flags(gz: Gzvm) -> None:
    assert gz.irqfd(eventfd(), 1, gm.IRQFD_RESAMPLE, resamplefd=eventfd()) == 0, "RESAMPLE is accepted"
    refused(gz.model, gz.irqfd(eventfd(), 2, 4), gm.R_IRQFD_FLAGS)


def closed_fd() -> int:
    """An fd number nothing holds (call it after opening what the test needs)."""
    fd = eventfd()
    os.close(fd)
    return fd


def test_irqfd_resamplefd_must_be_an_open_eventfd(gz: Gzvm) -> None:
    event = eventfd()
    refused(gz.model, gz.irqfd(event, 1, gm.IRQFD_RESAMPLE, resamplefd=closed_fd()), gm.R_RESAMPLEFD_BADF)
    with open(os.devnull, "rb") as null:
        refused(gz.model, gz.irqfd(event, 1, gm.IRQFD_RESAMPLE, resamplefd=null.fileno()), gm.R_RESAMPLEFD_NOT_EVENTFD)
    vm = gz.model.files[gz.vm]
    assert isinstance(vm, gm.ModelVm) and vm.irqfds == [], "nothing was assigned"


def test_irqfd_checks_in_the_drivers_order(gz: Gzvm) -> None:
    """``gzvm_irqfd_assign``: the eventfd, then the resamplefd, then EBUSY;
    DEASSIGN never looks at the resamplefd."""
    event = eventfd()
    closed = closed_fd()
    refused(gz.model, gz.irqfd(closed, 1, gm.IRQFD_RESAMPLE, resamplefd=closed), gm.R_EVENTFD_BADF)
    assert gz.irqfd(event, 1) == 0
    refused(gz.model, gz.irqfd(event, 2, gm.IRQFD_RESAMPLE, resamplefd=closed), gm.R_RESAMPLEFD_BADF)
    assert gz.irqfd(event, 1, gm.IRQFD_DEASSIGN | gm.IRQFD_RESAMPLE, resamplefd=closed) == 0


def test_irqfd_needs_an_open_fd(gz: Gzvm) -> None:
    closed = eventfd()
    os.close(closed)
    refused(gz.model, gz.irqfd(closed, 1), gm.R_EVENTFD_BADF)


def test_irqfd_needs_an_eventfd(gz: Gzvm) -> None:
    with open(os.devnull, "rb") as null:
        refused(gz.model, gz.irqfd(null.fileno(), 1), gm.R_NOT_EVENTFD)


def test_irqfd_eventfd_used_once(gz: Gzvm) -> None:
    event = eventfd()
    assert gz.irqfd(event, 1) == 0
    refused(gz.model, gz.irqfd(os.dup(event), 2), gm.R_IRQFD_BUSY)  # a dup is the same eventfd
    assert gz.irqfd(event, 1, gm.IRQFD_DEASSIGN) == 0
    assert gz.irqfd(event, 2) == 0, "deassigned: the eventfd is free again"
    assert gz.irqfd(event, 7, gm.IRQFD_DEASSIGN) == 0, "deassigning nothing is not an error"


def test_irqfd_raises_a_count_written_before_it(gz: Gzvm) -> None:
    """``gzvm_irqfd_assign``: what ``vfs_poll`` finds in the eventfd at assign
    raises the SPI at once; an empty eventfd raises nothing until written."""
    assert gz.create_device(gm.DEV_VGIC_V3_DIST, 0x0800_0000, 0x1_0000) == 0
    assert gz.create_device(gm.DEV_VGIC_V3_REDIST, 0x080A_0000, 0x2_0000) == 0
    gz.vcpu(0)
    vm = gz.model.files[gz.vm]
    assert isinstance(vm, gm.ModelVm)
    quiet = eventfd()
    assert gz.irqfd(quiet, 2) == 0
    assert gz.model.stats.spis_raised == 0, "nothing written: nothing raised"
    event = eventfd()
    os.eventfd_write(event, 1)
    woken = vm.wake_generation
    assert gz.irqfd(event, 3) == 0
    assert gz.model.stats.spis_raised == 1, "the earlier count raised the line at assign"
    assert vm.wake_generation > woken, "and woke the idle vCPUs (gzvm_vcpu_wakeup_all)"
    assert vm.poll_irqfds() is False, "that count is not raised a second time"
    os.eventfd_write(event, 1)
    assert vm.poll_irqfds() is True
    assert gz.model.stats.spis_raised == 2


def test_lowering_a_pending_line_is_the_vgics_answer(gz: Gzvm) -> None:
    """Whether lowering an SPI still pending clears it depends on its edge/level
    configuration in the hypervisor's vGIC: the model does not guess."""
    assert gz.create_device(gm.DEV_VGIC_V3_DIST, 0x0800_0000, 0x1_0000) == 0
    assert gz.create_device(gm.DEV_VGIC_V3_REDIST, 0x080A_0000, 0x2_0000) == 0
    gz.vcpu(0)
    assert gz.call(gm.GZVM_IRQ_LINE, gm.IRQ_LEVEL.pack(4, 0)) == 0, "a line not pending: lowering changes nothing"
    assert gz.call(gm.GZVM_IRQ_LINE, gm.IRQ_LEVEL.pack(3, 1)) == 0
    with pytest.raises(ModelGap, match="while it is pending"):
        gz.call(gm.GZVM_IRQ_LINE, gm.IRQ_LEVEL.pack(3, 0))


def test_an_interrupt_line_wakes_every_idle_vcpu(gz: Gzvm) -> None:
    """``gzvm_irqchip_inject_irq`` bumps every vCPU's ``virtio_irq`` before the
    line goes to the hypervisor, lowered or raised."""
    assert gz.create_device(gm.DEV_VGIC_V3_DIST, 0x0800_0000, 0x1_0000) == 0
    assert gz.create_device(gm.DEV_VGIC_V3_REDIST, 0x080A_0000, 0x2_0000) == 0
    gz.vcpu(0)
    vm = gz.model.files[gz.vm]
    assert isinstance(vm, gm.ModelVm)
    woken = vm.wake_generation
    assert gz.call(gm.GZVM_IRQ_LINE, gm.IRQ_LEVEL.pack(5, 0)) == 0
    assert vm.wake_generation == woken + 1


# --- ioeventfds ----------------------------------------------------------------------------
def test_ioeventfd_length(gz: Gzvm) -> None:
    refused(gz.model, gz.ioeventfd(eventfd(), 0x0A00_0000, 3), gm.R_IOEVENTFD_LEN)


def test_ioeventfd_must_not_wrap(gz: Gzvm) -> None:
    refused(gz.model, gz.ioeventfd(eventfd(), (1 << 64) - 2, 4), gm.R_IOEVENTFD_WRAP)


def test_ioeventfd_flags(gz: Gzvm) -> None:
    refused(gz.model, gz.ioeventfd(eventfd(), 0x0A00_0000, 4, 8), gm.R_IOEVENTFD_FLAGS)


def test_ioeventfd_datamatch_needs_a_length(gz: Gzvm) -> None:
    refused(gz.model, gz.ioeventfd(eventfd(), 0x0A00_0000, 0, gm.IOEVENTFD_DATAMATCH), gm.R_IOEVENTFD_DATAMATCH_LEN)


def test_ioeventfd_has_no_port_io(gz: Gzvm) -> None:
    refused(gz.model, gz.ioeventfd(eventfd(), 0x3F8, 1, gm.IOEVENTFD_PIO), gm.R_IOEVENTFD_PIO)


def test_ioeventfd_needs_an_eventfd(gz: Gzvm) -> None:
    closed = eventfd()
    os.close(closed)
    refused(gz.model, gz.ioeventfd(closed, 0x0A00_0000, 4), gm.R_EVENTFD_BADF)
    with open(os.devnull, "rb") as null:
        refused(gz.model, gz.ioeventfd(null.fileno(), 0x0A00_0000, 4), gm.R_NOT_EVENTFD)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((0x100, 4, 0, 0), (0x100, 4, 0, 0)),  # same address and length, wildcards
        ((0x100, 4, gm.IOEVENTFD_DATAMATCH, 7), (0x100, 4, gm.IOEVENTFD_DATAMATCH, 7)),  # same data
        ((0x100, 0, 0, 0), (0x100, 4, gm.IOEVENTFD_DATAMATCH, 7)),  # any length vs one length
        ((0x100, 8, 0, 0), (0x104, 4, 0, 0)),  # inside the first one's range
    ],
    ids=["same", "same-data", "any-length", "inside"],
)
def test_ioeventfd_collision(gz: Gzvm, first: tuple[int, int, int, int], second: tuple[int, int, int, int]) -> None:
    addr, length, flags, data = first
    assert gz.ioeventfd(eventfd(), 0x0A00_0000 + addr, length, flags, data) == 0
    addr, length, flags, data = second
    refused(gz.model, gz.ioeventfd(eventfd(), 0x0A00_0000 + addr, length, flags, data), gm.R_IOEVENTFD_COLLISION)


def test_ioeventfd_other_data_at_the_same_address_still_collides(gz: Gzvm) -> None:
    """Unlike KVM: the range test of ``ioeventfd_check_collision`` also catches
    an ioeventfd at the *same* address, whatever its data."""
    assert gz.ioeventfd(eventfd(), 0x0A00_0100, 4, gm.IOEVENTFD_DATAMATCH, 7) == 0
    refused(gz.model, gz.ioeventfd(eventfd(), 0x0A00_0100, 4, gm.IOEVENTFD_DATAMATCH, 8), gm.R_IOEVENTFD_COLLISION)
    assert gz.ioeventfd(eventfd(), 0x0A00_0104, 4, gm.IOEVENTFD_DATAMATCH, 8) == 0, "past its range: fine"


def test_ioeventfd_deassign_must_match(gz: Gzvm) -> None:
    event = eventfd()
    assert gz.ioeventfd(event, 0x0A00_0100, 4, gm.IOEVENTFD_DATAMATCH, 7) == 0
    deassign = gm.IOEVENTFD_DEASSIGN | gm.IOEVENTFD_DATAMATCH
    refused(gz.model, gz.ioeventfd(event, 0x0A00_0100, 4, deassign, 8), gm.R_IOEVENTFD_NOENT)
    refused(gz.model, gz.ioeventfd(event, 0x0A00_0100, 2, deassign, 7), gm.R_IOEVENTFD_NOENT)
    assert gz.ioeventfd(event, 0x0A00_0100, 4, deassign, 7) == 0
    refused(gz.model, gz.ioeventfd(event, 0x0A00_0100, 4, deassign, 7), gm.R_IOEVENTFD_NOENT)


# --- running ---------------------------------------------------------------------------------
def run_struct(padding: bytes = bytes(3), immediate_exit: int = 0) -> bytes:
    return struct.pack("<IB3s", 0, immediate_exit, padding) + bytes(256)


def test_run_padding_must_be_zero(gz: Gzvm) -> None:
    vcpu = gz.vcpu(0)
    refused(gz.model, gz.call(gm.GZVM_RUN, run_struct(padding=b"\0\1\0"), fd=vcpu), gm.R_RUN_PADDING)


def test_run_immediate_exit_is_checked_at_entry(gz: Gzvm) -> None:
    vcpu = gz.vcpu(0)
    assert gz.call(gm.GZVM_RUN, run_struct(immediate_exit=1), fd=vcpu) == -errno.EINTR
    assert gz.model.rejections == []
    assert gz.model.stats.hypervisor_entries == 0


def test_run_needs_a_valid_pointer(gz: Gzvm) -> None:
    vcpu = gz.vcpu(0)
    refused(gz.model, gz.call(gm.GZVM_RUN, 0x10, fd=vcpu), EFAULT_RULE)


def test_the_driver_has_no_set_memory_region_nor_mmap(gz: Gzvm) -> None:
    refused(gz.model, gz.call(0x40189240, bytes(24)), NO_SUCH_IOCTL)
    vcpu = gz.vcpu(0)
    with pytest.raises(OSError) as raised:
        gz.model.mmap(vcpu, PAGE, 0)
    assert raised.value.errno == errno.ENODEV
    assert gz.model.last_rejection is not None and gz.model.last_rejection.rule is NO_MMAP
    gz.model.rejections.clear()


# --- teardown ------------------------------------------------------------------------------------
def test_closing_the_vm_before_its_vcpus_is_advised_against(gz: Gzvm) -> None:
    vcpu = gz.vcpu(0)
    assert gz.model.close(gz.vm) == 0, "the driver closes it"
    last = gz.model.last_rejection
    assert last is not None and last.rule is gm.R_VM_CLOSED_FIRST
    gz.model.rejections.clear()
    assert gz.model.close(vcpu) == 0


def test_closing_vcpus_first_is_clean(gz: Gzvm) -> None:
    vcpu = gz.vcpu(0)
    assert gz.model.close(vcpu) == 0
    assert gz.model.close(gz.vm) == 0
    assert gz.model.rejections == []


def test_run_threads_are_independent(gz: Gzvm) -> None:
    """Two vCPUs kicked from outside while their guests are parked (no PC set
    needed: the signal is pending before the hypervisor is entered)."""
    vcpus = [gz.vcpu(0), gz.vcpu(1)]
    results: list[int] = []

    def run(fd: int) -> None:
        gz.model.post_signal(threading.get_ident())
        results.append(gz.call(gm.GZVM_RUN, run_struct(), fd=fd))

    threads = [threading.Thread(target=run, args=(fd,)) for fd in vcpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [-errno.EINTR, -errno.EINTR], "ERESTARTSYS reaches the caller as EINTR"
