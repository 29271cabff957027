"""One deliberately wrong call per rule the Gunyah model enforces: the caller
gets the rule's errno and the model names the rule.  The rules and their sources
are in ``gunyah_model.py``; the guest-execution rules (run loop, MMIO
completion) are tested in ``test_gunyah_model_run.py``."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import gunyah_model as gm
import pytest
from gunyah_raw import PAGE, RawVm, address, buffer

from pyvmm.testing import driver_model as dm
from pyvmm.testing.driver_model import Rule


@pytest.fixture
def raw() -> Iterator[RawVm]:
    vm = RawVm.create(gm.GunyahModel())
    yield vm
    vm.close()


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


Case = Callable[[RawVm, int], int]


def _started(raw: RawVm) -> int:
    vcpu = raw.startable()
    assert raw.start() == 0
    return vcpu


def _mem_foreign(raw: RawVm, efd: int) -> int:
    with raw.model.foreign_process():
        return raw.region(0, 0)


def _run_foreign(raw: RawVm, efd: int) -> int:
    vcpu = _started(raw)
    with raw.model.foreign_process():
        return raw.ioctl(gm.GH_VCPU_RUN, 0, fd=vcpu)


def _reclaim_foreign(raw: RawVm, efd: int) -> int:
    with raw.model.foreign_process():
        return raw.ioctl(gm.GH_VM_RECLAIM_REGION, gm.RANGE.pack(0, PAGE))


def _mem_label_twice(raw: RawVm, efd: int) -> int:
    assert raw.region(3, 0) == 0
    return raw.region(3, 0x100000)


def _mem_overlap(raw: RawVm, efd: int) -> int:
    assert raw.region(0, 0) == 0
    return raw.region(1, 8 * PAGE)


def _boot_after_start(raw: RawVm, efd: int) -> int:
    _started(raw)
    return raw.boot(gm.REG_SET_PC << 8, 0x1000)


def _vcpu_twice(raw: RawVm, efd: int) -> int:
    assert raw.add_vcpu(1) >= 0
    return raw.add_vcpu(1)


def _doorbell_twice(raw: RawVm, efd: int) -> int:
    assert raw.irqfd(efd, 5) == 0
    return raw.irqfd(efd, 5)


def _ioeventfd_twice(raw: RawVm, efd: int) -> int:
    assert raw.ioeventfd(efd, 0x9000_0000, 4, gm.IOEVENTFD_DATAMATCH, data=7) == 0
    return raw.ioeventfd(efd, 0x9000_0000, 4, gm.IOEVENTFD_DATAMATCH, data=7)


def _ioeventfd_any_length_covers_datamatch(raw: RawVm, efd: int) -> int:
    # A registration without DATAMATCH matches every access at its address, so a
    # datamatch one there clashes with it (vm_mgr.c _gunyah_vm_io_handler_compare).
    assert raw.ioeventfd(efd, 0x9000_0000, 4) == 0
    return raw.ioeventfd(efd, 0x9000_0000, 4, gm.IOEVENTFD_DATAMATCH, data=1)


def _not_an_eventfd(raw: RawVm, efd: int) -> int:
    return raw.irqfd(raw.dev, 1)


def _closed_eventfd(raw: RawVm, efd: int) -> int:
    spare = os.eventfd(0)
    os.close(spare)
    return raw.ioeventfd(spare, 0x9000_0000)


def _remove_nothing(raw: RawVm, efd: int) -> int:
    return raw.ioeventfd(efd, 0x9000_0000, remove=True)


def _start_without_dtb(raw: RawVm, efd: int) -> int:
    assert raw.region(0, 0) == 0
    return raw.start()


def _start_dtb_below_a_page(raw: RawVm, efd: int) -> int:
    assert raw.region(0, 0) == 0
    assert raw.dtb(0, 0x800) == 0
    return raw.start()


def _start_dtb_outside_memory(raw: RawVm, efd: int) -> int:
    assert raw.region(0, 0) == 0
    assert raw.dtb(0x4000_0000) == 0
    return raw.start()


def _start_after_failed_start(raw: RawVm, efd: int) -> int:
    assert raw.start() == -errno.EINVAL
    raw.model.rejections.clear()  # that first failure is the setup, not the case
    return raw.start()


def _run_before_start(raw: RawVm, efd: int) -> int:
    vcpu = raw.startable()
    return raw.ioctl(gm.GH_VCPU_RUN, 0, fd=vcpu)


def _run_removed(raw: RawVm, efd: int) -> int:
    vcpu = _started(raw)
    assert raw.fn(gm.GH_VM_REMOVE_FUNCTION, gm.FN_VCPU_TYPE, gm.FN_VCPU.pack(0)) == 0
    return raw.ioctl(gm.GH_VCPU_RUN, 0, fd=vcpu)


def _mmap_offset(raw: RawVm, efd: int) -> int:
    vcpu = raw.add_vcpu(0)
    try:
        raw.model.mmap(vcpu, PAGE, PAGE)
    except OSError as exc:
        return -(exc.errno or 0)
    return 0


def _set_one_reg(raw: RawVm, efd: int) -> int:
    # KVM_SET_ONE_REG (docs/backends/kvm.md §2.3): Gunyah vCPUs have no register
    # ioctl at all (docs/backends/gunyah.md §8.1).
    vcpu = raw.add_vcpu(0)
    return raw.ioctl(0x4010AEAC, bytes(16), fd=vcpu)


def _vm_ioctl_on_device(raw: RawVm, efd: int) -> int:
    return raw.ioctl(gm.GH_VM_START, fd=raw.dev)


def _null_pointer(raw: RawVm, efd: int) -> int:
    return raw.ioctl(gm.GH_VM_SET_DTB_CONFIG, 0)


def _closed_fd(raw: RawVm, efd: int) -> int:
    return raw.model.ioctl(efd, gm.GH_VM_START, 0)


def _fn_arg_pointer_null(raw: RawVm, efd: int) -> int:
    return raw.ioctl(gm.GH_VM_ADD_FUNCTION, gm.FN_DESC.pack(gm.FN_VCPU_TYPE, 4, 0))


CASES: list[tuple[Rule, Case]] = [
    (gm.R_CREATE_ARG, lambda raw, efd: raw.ioctl(gm.GH_CREATE_VM, 1, fd=raw.dev)),
    (gm.R_FOREIGN_MM, _mem_foreign),
    (gm.R_FOREIGN_MM, _run_foreign),
    (gm.R_FOREIGN_MM, _reclaim_foreign),
    (gm.R_MEM_FLAGS, lambda raw, efd: raw.region(0, 0, flags=8)),
    (gm.R_MEM_ALIGN, lambda raw, efd: raw.region(0, 0x800)),
    (gm.R_MEM_ALIGN, lambda raw, efd: raw.region(0, 0, size=PAGE + 1)),
    (gm.R_MEM_ALIGN, lambda raw, efd: raw.region(0, 0, size=0)),
    (gm.R_MEM_ALIGN, lambda raw, efd: raw.region(0, 0, host=raw.ram() + 8)),
    (gm.R_MEM_WRAP, lambda raw, efd: raw.region(0, (1 << 64) - PAGE, size=2 * PAGE)),
    (gm.R_MEM_OVERLAP, _mem_overlap),
    (gm.R_MEM_LABEL, _mem_label_twice),
    (gm.R_DTB_WRAP, lambda raw, efd: raw.dtb((1 << 64) - PAGE, 2 * PAGE)),
    (gm.R_FW_WRAP, lambda raw, efd: raw.ioctl(gm.GH_VM_ANDROID_SET_FW_CONFIG, gm.RANGE.pack(1 << 63, 1 << 63))),
    (gm.R_BOOT_REG, lambda raw, efd: raw.boot(gm.REG_SET_X << 8 | 32, 0)),
    (gm.R_BOOT_REG, lambda raw, efd: raw.boot(gm.REG_SET_PC << 8 | 1, 0)),
    (gm.R_BOOT_REG, lambda raw, efd: raw.boot(gm.REG_SET_SP << 8 | 3, 0)),
    (gm.R_BOOT_REG, lambda raw, efd: raw.boot(3 << 8, 0)),
    (gm.R_BOOT_REG, lambda raw, efd: raw.boot(1 << 16 | gm.REG_SET_PC << 8, 0)),
    (gm.R_BOOT_AFTER_START, _boot_after_start),
    (gm.R_FN_ARG_MAX, lambda raw, efd: raw.fn(gm.GH_VM_ADD_FUNCTION, gm.FN_VCPU_TYPE, bytes(4), arg_size=257)),
    (gm.R_FN_ARG_SIZE, lambda raw, efd: raw.fn(gm.GH_VM_ADD_FUNCTION, gm.FN_VCPU_TYPE, bytes(8))),
    (gm.R_FN_ARG_SIZE, lambda raw, efd: raw.fn(gm.GH_VM_ADD_FUNCTION, gm.FN_IOEVENTFD_TYPE, bytes(16))),
    (gm.R_FN_TYPE, lambda raw, efd: raw.fn(gm.GH_VM_ADD_FUNCTION, 9, bytes(4))),
    (gm.R_FN_TICKET, _vcpu_twice),
    (gm.R_FN_TICKET, _doorbell_twice),
    (gm.R_IRQFD_FLAGS, lambda raw, efd: raw.irqfd(efd, 1, flags=2)),
    (gm.R_NOT_EVENTFD, _not_an_eventfd),
    (gm.R_EVENTFD_BADF, _closed_eventfd),
    (gm.R_IOEVENTFD_FLAGS, lambda raw, efd: raw.ioeventfd(efd, 0x9000_0000, 4, flags=1 << 1, data=1)),
    (gm.R_IOEVENTFD_LEN, lambda raw, efd: raw.ioeventfd(efd, 0x9000_0000, 3)),
    (gm.R_IOEVENTFD_DATAMATCH_LEN, lambda raw, efd: raw.ioeventfd(efd, 0x9000_0000, 0, gm.IOEVENTFD_DATAMATCH)),
    (gm.R_IOEVENTFD_WRAP, lambda raw, efd: raw.ioeventfd(efd, (1 << 64) - 2, 4)),
    (gm.R_IOEVENTFD_DUP, _ioeventfd_twice),
    (gm.R_IOEVENTFD_DUP, _ioeventfd_any_length_covers_datamatch),
    (gm.R_REMOVE_NONE, _remove_nothing),
    (gm.R_START_DTB_SIZE, _start_without_dtb),
    (gm.R_START_DTB_SIZE, _start_dtb_below_a_page),
    (gm.R_START_DTB_MEMORY, _start_dtb_outside_memory),
    (gm.R_START_FAILED, _start_after_failed_start),
    (gm.R_RUN_UNBOUND, _run_before_start),
    (gm.R_RUN_REMOVED, _run_removed),
    (gm.R_MMAP_OFFSET, _mmap_offset),
    (gm.R_RECLAIM_ALIGN, lambda raw, efd: raw.ioctl(gm.GH_VM_RECLAIM_REGION, gm.RANGE.pack(0x800, PAGE))),
    (gm.R_AUTH_TYPE, lambda raw, efd: raw.ioctl(gm.GH_VM_ANDROID_SET_AUTH_TYPE, gm.AUTH_DESC.pack(7, 0, 0))),
    (dm.NO_SUCH_IOCTL, _set_one_reg),
    (dm.NO_SUCH_IOCTL, _vm_ioctl_on_device),
    (dm.NO_SUCH_IOCTL, lambda raw, efd: raw.ioctl(0x00004110)),  # GH_ANDROID_TENTATIVE_UAPI: ABI A header only
    (dm.EFAULT_RULE, _null_pointer),
    (dm.EFAULT_RULE, _fn_arg_pointer_null),
    (dm.BAD_FD, _closed_fd),
]


def _case_id(case: tuple[Rule, Case]) -> str:
    rule, fn = case
    return f"{rule.id}-{getattr(fn, '__name__', 'lambda').strip('_<>')}"


@pytest.mark.parametrize("case", CASES, ids=[f"{i:02}-{_case_id(c)}" for i, c in enumerate(CASES)])
def test_breaking_a_rule_gives_its_errno_and_names_it(raw: RawVm, eventfd: int, case: tuple[Rule, Case]) -> None:
    rule, call = case
    before = len(raw.model.rejections)
    result = call(raw, eventfd)
    assert result == -rule.errno
    rejection = raw.model.last_rejection
    assert rejection is not None
    assert rejection.rule is rule, f"expected {rule.id}, the model applied {rejection.rule.id}"
    # Exactly one rule fired, on the call under test (setup calls broke none).
    assert len(raw.model.rejections) == before + 1
    assert rejection.call.errno == rule.errno


def test_memory_after_start_is_accepted_but_recorded(raw: RawVm) -> None:
    _started(raw)
    assert raw.region(5, 0x1_0000_0000) == 0  # the driver takes it...
    (rejection,) = raw.model.rejections
    assert rejection.rule is gm.R_MEM_AFTER_START  # ...the model flags it
    assert rejection.call.name == "GH_VM_SET_USER_MEM_REGION"


def test_every_model_rule_has_a_negative_test() -> None:
    rules = {value for value in vars(gm).values() if isinstance(value, Rule) and value.id.startswith("GH-")}
    tested = {rule for rule, _ in CASES} | {gm.R_MEM_AFTER_START}
    from test_gunyah_model_run import RUN_RULES

    tested |= set(RUN_RULES)
    assert rules - tested == set()


def test_every_rule_cites_a_source() -> None:
    for value in vars(gm).values():
        if isinstance(value, Rule) and value.id.startswith("GH-"):
            assert value.source and value.summary, value.id
            assert "docs/backends/gunyah.md §" in value.source or ".c" in value.source, value.id
            assert "reference/" not in value.source, f"{value.id} cites a file outside the repository"


def test_lent_memory_is_recorded_as_lost_to_the_host(raw: RawVm) -> None:
    host = raw.ram(4 * PAGE)
    region = gm.MEM_REGION.pack(0, 7, 0, 4 * PAGE, host)
    assert raw.ioctl(gm.GH_VM_ANDROID_LEND_USER_MEM, region) == 0
    assert not raw.model.host_may_access(host + PAGE, 8)
    assert raw.model.host_may_access(host + 4 * PAGE, 8)
    assert raw.model.close(raw.fd) == 0  # teardown reclaims it
    assert raw.model.host_may_access(host + PAGE, 8)


def test_a_vcpu_fd_keeps_its_vm_alive(raw: RawVm) -> None:
    vcpu = _started(raw)
    assert raw.model.close(raw.fd) == 0
    (vm,) = raw.model.vms  # still there: the vCPU holds a reference
    assert vm.vcpus[0].bound
    assert raw.model.close(vcpu) == 0
    assert raw.model.vms == []


def test_start_twice_is_a_no_op(raw: RawVm) -> None:
    _started(raw)
    assert raw.start() == 0
    raw.model.assert_no_rejections()


def test_checks_apply_in_the_driver_order(raw: RawVm) -> None:
    # gunyah_vcpu_run: a removed function (ENODEV) is found before a foreign mm (EPERM).
    vcpu = _started(raw)
    assert raw.fn(gm.GH_VM_REMOVE_FUNCTION, gm.FN_VCPU_TYPE, gm.FN_VCPU.pack(0)) == 0
    with raw.model.foreign_process():
        assert raw.ioctl(gm.GH_VCPU_RUN, 0, fd=vcpu) == -errno.ENODEV


def test_removing_a_vcpu_sets_immediate_exit_and_frees_its_id(raw: RawVm) -> None:
    vcpu = raw.add_vcpu(2)
    page = raw.model.mmap(vcpu, PAGE, 0)
    try:
        assert raw.fn(gm.GH_VM_REMOVE_FUNCTION, gm.FN_VCPU_TYPE, gm.FN_VCPU.pack(2)) == 0
        assert page[gm.RUN_IMMEDIATE_EXIT] == 1
        assert raw.add_vcpu(2) >= 0
    finally:
        page.close()


def test_irqfd_writes_before_start_are_dropped(raw: RawVm, eventfd: int) -> None:
    assert raw.irqfd(eventfd, 4) == 0
    os.eventfd_write(eventfd, 1)
    _started(raw)
    (vm,) = raw.model.vms
    bell = vm.doorbells[4]
    assert (bell.dropped, bell.rung) == (1, 0)
    os.eventfd_write(eventfd, 1)
    assert vm.poll_doorbells()
    assert (bell.dropped, bell.rung) == (1, 1)


def test_ioeventfd_remove_matches_address_length_and_data(raw: RawVm, eventfd: int) -> None:
    assert raw.ioeventfd(eventfd, 0x9000_0000, 4, gm.IOEVENTFD_DATAMATCH, data=7) == 0
    assert raw.ioeventfd(eventfd, 0x9000_0000, 4, gm.IOEVENTFD_DATAMATCH, data=8, remove=True) == -errno.ENOENT
    assert raw.ioeventfd(eventfd, 0x9000_0000, 4, gm.IOEVENTFD_DATAMATCH, data=7, remove=True) == 0


def test_check_extension_takes_the_capability_by_value(raw: RawVm) -> None:
    assert raw.ioctl(gm.GH_VM_CHECK_EXTENSION, gm.CAP_VCPU_TIMER_WAKEUP) == 1
    assert raw.ioctl(gm.GH_VM_CHECK_EXTENSION, 99) == 0


def test_unmodelled_parts_fail_loudly(raw: RawVm) -> None:
    with pytest.raises(dm.ModelGap, match="CMA"):
        raw.ioctl(gm.GH_VM_ANDROID_MAP_CMA_MEM, bytes(40))
    with pytest.raises(dm.ModelGap, match="authenticated"):
        raw.ioctl(gm.GH_VM_ANDROID_SET_AUTH_TYPE, gm.AUTH_DESC.pack(gm.AUTH_QCOM_TRUSTED_VM, 0, 0))


def test_seam_argument_is_an_address(raw: RawVm) -> None:
    # What the kernel receives: the struct's address as an unsigned long.
    buf = buffer(gm.RANGE.pack(0x8000_0000, PAGE))
    assert raw.model.ioctl(raw.fd, gm.GH_VM_SET_DTB_CONFIG, address(buf)) == 0
    (vm,) = raw.model.vms
    assert vm.dtb == (0x8000_0000, PAGE)
