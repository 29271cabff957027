"""One deliberately wrong call per rule the Gunyah model enforces: the caller
gets the rule's errno and the model names the rule -- and the calls ABI B
accepts although an older ABI or the documentation would not.  The rules and
their sources are in ``pyvmm_gunyah/model.py``; the guest-execution rules (run
loop, MMIO completion) are tested in ``test_gunyah_model_run.py``."""

from __future__ import annotations

import ast
import errno
import inspect
import os
import re
from collections.abc import Callable, Iterator

import gunyah_guests as guests
import pytest
from gunyah_raw import PAGE, RawVcpu, RawVm, address, buffer, raw_fdt, write_guest

from pyvmm.testing import driver_model as dm
from pyvmm.testing.driver_model import Rule
from pyvmm_gunyah import model as gm


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


def _ioeventfd_no_datamatch_twice(raw: RawVm, efd: int) -> int:
    # Without DATAMATCH the driver stores neither length nor data: their fields
    # never tell two such ioeventfds at one address apart (gunyah_ioeventfd_bind).
    assert raw.ioeventfd(efd, 0x9000_0000, 4, data=1) == 0
    return raw.ioeventfd(efd, 0x9000_0000, 2, data=2)


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


def _run_vcpu_the_tree_does_not_name(raw: RawVm, efd: int) -> int:
    raw.startable(tree=raw_fdt(vcpus=1))
    second = raw.add_vcpu(1)
    assert raw.start() == 0
    return raw.ioctl(gm.GH_VCPU_RUN, 0, fd=second)


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


def _dangling_pointer(raw: RawVm, efd: int) -> int:
    # Any address the process has not mapped faults, not only the null page.
    return raw.ioctl(gm.GH_VM_SET_DTB_CONFIG, (1 << 47) + 0x5000)


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
    (gm.R_IOEVENTFD_DUP, _ioeventfd_twice),
    (gm.R_IOEVENTFD_DUP, _ioeventfd_no_datamatch_twice),
    (gm.R_IOEVENTFD_DUP, _ioeventfd_any_length_covers_datamatch),
    (gm.R_REMOVE_NONE, _remove_nothing),
    (gm.R_START_DTB_SIZE, _start_without_dtb),
    (gm.R_START_DTB_SIZE, _start_dtb_below_a_page),
    (gm.R_START_DTB_MEMORY, _start_dtb_outside_memory),
    (gm.R_START_FAILED, _start_after_failed_start),
    (gm.R_RUN_UNBOUND, _run_before_start),
    (gm.R_RUN_UNBOUND, _run_vcpu_the_tree_does_not_name),
    (gm.R_RUN_REMOVED, _run_removed),
    (gm.R_RECLAIM_ALIGN, lambda raw, efd: raw.ioctl(gm.GH_VM_RECLAIM_REGION, gm.RANGE.pack(0x800, PAGE))),
    (gm.R_AUTH_TYPE, lambda raw, efd: raw.ioctl(gm.GH_VM_ANDROID_SET_AUTH_TYPE, gm.AUTH_DESC.pack(0, 0, 0))),
    (gm.R_AUTH_TYPE, lambda raw, efd: raw.ioctl(gm.GH_VM_ANDROID_SET_AUTH_TYPE, gm.AUTH_DESC.pack(7, 0, 0))),
    (dm.NO_SUCH_IOCTL, _set_one_reg),
    (dm.NO_SUCH_IOCTL, _vm_ioctl_on_device),
    (dm.NO_SUCH_IOCTL, lambda raw, efd: raw.ioctl(0x00004110)),  # GH_ANDROID_TENTATIVE_UAPI: ABI A header only
    (dm.NO_SUCH_IOCTL, lambda raw, efd: raw.ioctl(gm.GUNYAH_CREATE_GUEST_MEM, bytes(64), fd=raw.dev)),  # ABI C only
    (dm.NO_SUCH_IOCTL, lambda raw, efd: raw.ioctl(gm.GUNYAH_VM_MAP_MEM, bytes(32))),  # ABI C only
    (dm.EFAULT_RULE, _null_pointer),
    (dm.EFAULT_RULE, _fn_arg_pointer_null),
    (dm.EFAULT_RULE, _dangling_pointer),
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


#: ``file.c function``: the driver function a rule comes from.
_DRIVER_FUNCTION = re.compile(r"\b\w+\.c \w+")


def test_every_rule_cites_the_notes_and_the_driver_function() -> None:
    for value in vars(gm).values():
        if isinstance(value, Rule) and value.id.startswith("GH-"):
            assert value.source and value.summary, value.id
            assert "docs/backends/gunyah.md §" in value.source, value.id
            assert _DRIVER_FUNCTION.search(value.source), f"{value.id} names no driver function: {value.source}"
            assert "reference/" not in value.source, f"{value.id} cites a file outside the repository"


def test_the_model_does_not_use_the_plugins_bindings() -> None:
    """The model reads the plugin's structs with its own formats: it may import
    the plugin's host switch (to install itself) and nothing else of it."""
    tree = ast.parse(inspect.getsource(gm))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    plugin = {name for name in imported if name.startswith("pyvmm_gunyah")}
    assert plugin == {"pyvmm_gunyah.host"}


# --- what ABI B accepts (the ABI A rules and dead checks it does not have) --------------


def test_memory_labels_need_not_be_unique(raw: RawVm) -> None:
    assert raw.region(3, 0) == 0
    assert raw.region(3, 0x100000) == 0
    assert [b.label for b in raw.model.vms[0].bindings] == [3, 3]
    raw.model.assert_no_rejections()


def test_a_region_ending_exactly_at_2_64_is_accepted(raw: RawVm) -> None:
    assert raw.region(0, (1 << 64) - 2 * PAGE, size=2 * PAGE) == 0
    assert raw.region(1, (1 << 64) - 4 * PAGE, size=2 * PAGE) == 0
    raw.model.assert_no_rejections()


def test_wrapping_dtb_and_firmware_ranges_are_stored(raw: RawVm) -> None:
    assert raw.dtb((1 << 64) - PAGE, 2 * PAGE) == 0
    assert raw.ioctl(gm.GH_VM_ANDROID_SET_FW_CONFIG, gm.RANGE.pack(1 << 63, 1 << 63)) == 0
    (vm,) = raw.model.vms
    assert vm.dtb == ((1 << 64) - PAGE, 2 * PAGE)
    assert vm.firmware == (1 << 63, 1 << 63)
    raw.model.assert_no_rejections()


def test_an_ioeventfd_running_past_2_64_is_accepted(raw: RawVm, eventfd: int) -> None:
    assert raw.ioeventfd(eventfd, (1 << 64) - 2, 4) == 0
    raw.model.assert_no_rejections()


def test_x31_is_a_boot_register_the_driver_takes(raw: RawVm) -> None:
    assert raw.boot(gm.REG_SET_X << 8 | 31, 0x1234) == 0
    raw.model.assert_no_rejections()
    # What the RM does with it is not in the driver: the model says so at START.
    raw.startable()
    with pytest.raises(dm.ModelGap, match="X31"):
        raw.start()


def test_a_mapping_beyond_the_run_page_is_not_modelled(raw: RawVm) -> None:
    vcpu = raw.add_vcpu(0)
    with pytest.raises(dm.ModelGap, match="SIGBUS"):
        raw.model.mmap(vcpu, PAGE, PAGE)


# --- lent memory: lost at START (config parcel) or first touch, not at LEND ---------------


def test_lent_memory_is_lost_at_start_and_on_first_touch(raw: RawVm) -> None:
    vcpu = RawVcpu.of(raw, raw.startable(code=guests.LENT_TOUCH.code, lend=True))
    host = raw.host_ram
    model = raw.model
    assert model.host_may_access(host, 16 * PAGE), "lending is only a binding: nothing is taken yet"
    write_guest(host, 12 * PAGE, b"still the host's")
    assert raw.start() == 0
    # START lent the config-image parcel: the device tree's page.
    assert not model.host_may_access(host + 8 * PAGE)
    assert model.host_may_access(host, 8 * PAGE)
    assert vcpu.run() == 0
    assert vcpu.mmio()[:3] == (guests.MMIO_BASE, 4, True)
    # The guest fetched its code from page 0 and wrote page 4: both are its now.
    assert not model.host_may_access(host)
    assert not model.host_may_access(host + 4 * PAGE)
    assert model.host_may_access(host + PAGE, 3 * PAGE)
    assert model.host_may_access(host + 12 * PAGE, 4 * PAGE)
    assert model.stats.demand_pages == 2
    assert model.close(raw.fd) == 0
    assert model.close(vcpu.fd) == 0
    assert model.host_may_access(host, 16 * PAGE), "teardown reclaims every page"
    model.assert_no_rejections()


def test_shared_memory_stays_the_hosts(raw: RawVm) -> None:
    vcpu = RawVcpu.of(raw, raw.startable(code=guests.LENT_TOUCH.code))
    assert raw.start() == 0
    assert vcpu.run() == 0
    assert raw.model.host_may_access(raw.host_ram, 16 * PAGE)


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
    raw.startable(tree=raw_fdt(doorbells=[4], gic=True))
    assert raw.start() == 0
    (vm,) = raw.model.vms
    bell = vm.doorbells[4]
    assert (bell.dropped, bell.rung) == (1, 0)
    os.eventfd_write(eventfd, 1)
    assert vm.poll_doorbells()
    assert (bell.dropped, bell.rung) == (1, 1)


def test_only_doorbells_the_device_tree_names_get_a_resource(raw: RawVm) -> None:
    """gunyah_vm_add_resource_ticket: a ticket is populated by a resource the RM
    made -- at START, or at once when the irqfd comes after START -- and the RM
    makes a doorbell only for a ``vdevice-type = "doorbell"`` node."""
    events = {label: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for label in (1, 2, 3, 4)}
    try:
        assert raw.irqfd(events[1], 1) == 0
        assert raw.irqfd(events[2], 2) == 0
        raw.startable(tree=raw_fdt(doorbells=[1, 3], gic=True))
        assert raw.start() == 0
        assert raw.irqfd(events[3], 3) == 0  # after START, named: bound at once
        assert raw.irqfd(events[4], 4) == 0  # after START, not named: never bound
        (vm,) = raw.model.vms
        assert {label: bell.bound for label, bell in vm.doorbells.items()} == {1: True, 2: False, 3: True, 4: False}
        for fd in events.values():
            os.eventfd_write(fd, 1)
        assert vm.poll_doorbells()
        rung = {label: (bell.rung, bell.dropped) for label, bell in vm.doorbells.items()}
        assert rung == {1: (1, 0), 2: (0, 1), 3: (1, 0), 4: (0, 1)}
        raw.model.assert_no_rejections()
    finally:
        for fd in events.values():
            os.close(fd)


def test_a_vcpu_added_after_start_runs_if_the_tree_names_it(raw: RawVm) -> None:
    raw.startable(code=guests.LOOP.code, tree=raw_fdt(vcpus=2))
    assert raw.start() == 0
    late = RawVcpu.of(raw, raw.add_vcpu(1))
    (vm,) = raw.model.vms
    assert vm.vcpus[1].bound
    late.page[gm.RUN_IMMEDIATE_EXIT] = 1
    assert late.run() == -errno.EINTR  # through to the run loop: it has its resource
    raw.model.assert_no_rejections()


def test_datamatch_ioeventfds_with_other_values_share_an_address(raw: RawVm) -> None:
    """Same address and length, different values: two slots of the tree
    (_gunyah_vm_io_handler_compare), each write signals its own eventfd."""
    seven, eight = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2))
    try:
        assert raw.ioeventfd(seven, 0x9000_0000, 4, gm.IOEVENTFD_DATAMATCH, data=7) == 0
        assert raw.ioeventfd(eight, 0x9000_0000, 4, gm.IOEVENTFD_DATAMATCH, data=8) == 0
        (vm,) = raw.model.vms
        assert vm.mmio_write_handled(0x9000_0000, 4, 8)
        assert (raw.model.drain_eventfd(seven), raw.model.drain_eventfd(eight)) == (0, 1)
        assert not vm.mmio_write_handled(0x9000_0000, 4, 9)
        assert not vm.mmio_write_handled(0x9000_0000, 2, 7)  # DATAMATCH keeps the length
        raw.model.assert_no_rejections()
    finally:
        os.close(seven)
        os.close(eight)


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
        raw.ioctl(gm.GH_VM_ANDROID_SET_AUTH_TYPE, gm.AUTH_DESC.pack(gm.AUTH_TYPE_QCOM_TRUSTED_VM, 0, 0))


@pytest.mark.parametrize(
    ("tree", "gap"),
    [
        (bytes(64), "cannot parse"),
        (raw_fdt(vm_config=False), "without /gunyah-vm-config"),
        (raw_fdt(vcpus=0), "0 vCPUs enabled"),
    ],
)
def test_a_device_tree_the_rm_would_refuse_is_a_gap(raw: RawVm, tree: bytes, gap: str) -> None:
    raw.startable(tree=tree)
    with pytest.raises(dm.ModelGap, match=gap):
        raw.start()


def test_seam_argument_is_an_address(raw: RawVm) -> None:
    # What the kernel receives: the struct's address as an unsigned long.
    buf = buffer(gm.RANGE.pack(0x8000_0000, PAGE))
    assert raw.model.ioctl(raw.fd, gm.GH_VM_SET_DTB_CONFIG, address(buf)) == 0
    (vm,) = raw.model.vms
    assert vm.dtb == (0x8000_0000, PAGE)
