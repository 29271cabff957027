"""One negative test per rule of the HAXM driver model, on each host's front end:
the deliberately wrong call fails with the code the driver gives and the model
names the rule (``docs/backends/haxm.md`` §8)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from haxm_raw import PAGE, HostBuffer, RawVm, expect

from pyvmm.backend import address_of
from pyvmm.errors import HypervisorError
from pyvmm.testing.driver_model import BAD_BUFFER, EFAULT_RULE
from pyvmm_haxm import bindings as b
from pyvmm_haxm.bindings import ffi
from pyvmm_haxm.host import OUT
from pyvmm_haxm.model import (
    W_CREATE_VM_BUFFER,
    W_SHORT_BUFFER,
    W_UNKNOWN_SYSTEM_REQUEST,
    W_UNKNOWN_VM_REQUEST,
    HaxmWindowsModel,
)


@pytest.fixture
def vm(model: Any) -> Any:
    raw = RawVm()
    yield raw
    raw.close()


def test_at_most_eight_vms(model: Any) -> None:
    vms = [RawVm() for _ in range(8)]
    try:
        assert sorted(v.vm_id for v in vms) == list(range(8))
        expect(model, vms[0].rules.VM_LIMIT, RawVm)
    finally:
        for raw in vms:
            raw.close()
    again = RawVm()  # closing a VM frees its id
    assert again.vm_id == 0
    again.close()


def test_vcpu_id_below_sixteen(model: Any, vm: RawVm) -> None:
    expect(model, vm.rules.VCPU_ID, vm.vcpu, 16)
    assert vm.vcpu(15).handle >= 0


def test_msr_batch_below_0x20(model: Any, vm: RawVm) -> None:
    vcpu = vm.vcpu()
    expect(model, vm.rules.MSR_COUNT, vcpu.msrs, "GET_MSRS", [(0xC0000080, 0)] * 32)
    expect(model, vm.rules.MSR_COUNT, vcpu.msrs, "SET_MSRS", [(0xC0000100, 0)] * 32)
    assert vcpu.msrs("GET_MSRS", [(0xC0000080, 0)] * 31).done == 31


def test_ramblock_reserved_is_zero(model: Any, vm: RawVm) -> None:
    buffer = HostBuffer(PAGE)
    expect(model, vm.rules.RAMBLOCK_RESERVED, vm.add_ramblock, buffer.address, PAGE, 1)
    vm.add_ramblock(buffer.address, PAGE)


def test_ramblock_needs_start_and_size(model: Any, vm: RawVm) -> None:
    buffer = HostBuffer(PAGE)
    expect(model, vm.rules.RAMBLOCK_ARGS, vm.add_ramblock, buffer.address, 0)
    expect(model, vm.rules.RAMBLOCK_ARGS, vm.add_ramblock, 0, PAGE)


def test_ramblocks_do_not_overlap(model: Any, vm: RawVm) -> None:
    buffer = HostBuffer(4 * PAGE)
    vm.add_ramblock(buffer.address, 2 * PAGE)
    expect(model, vm.rules.RAMBLOCK_OVERLAP, vm.add_ramblock, buffer.address + PAGE, 2 * PAGE)
    # A stand-alone mapping makes a block too, and overlaps the same way.
    expect(model, vm.rules.RAMBLOCK_OVERLAP, vm.set_ram2, 0, PAGE, buffer.address, b.HAX_RAM_INFO_STANDALONE)
    vm.add_ramblock(buffer.address + 2 * PAGE, 2 * PAGE)


def test_set_ram2_reserved_are_zero(model: Any, vm: RawVm) -> None:
    buffer = HostBuffer(PAGE)
    vm.add_ramblock(buffer.address, PAGE)
    expect(model, vm.rules.SET_RAM_RESERVED, vm.set_ram2, 0, PAGE, buffer.address, 0, 1, 0)
    expect(model, vm.rules.SET_RAM_RESERVED, vm.set_ram2, 0, PAGE, buffer.address, 0, 0, 1)


def test_unmapping_is_invalid_alone_with_no_address(model: Any, vm: RawVm) -> None:
    buffer = HostBuffer(PAGE)
    vm.add_ramblock(buffer.address, PAGE)
    vm.set_ram2(0, PAGE, buffer.address)
    invalid = b.HAX_RAM_INFO_INVALID
    expect(model, vm.rules.SET_RAM_UNMAP_ARGS, vm.set_ram2, 0, PAGE, 0, invalid | b.HAX_RAM_INFO_ROM)
    expect(model, vm.rules.SET_RAM_UNMAP_ARGS, vm.set_ram2, 0, PAGE, buffer.address, invalid)
    vm.set_ram2(0, PAGE, 0, invalid)


def test_mapping_needs_an_address(model: Any, vm: RawVm) -> None:
    expect(model, vm.rules.SET_RAM_NO_VA, vm.set_ram2, 0, PAGE, 0)


def test_mapping_covers_a_page(model: Any, vm: RawVm) -> None:
    buffer = HostBuffer(PAGE)
    vm.add_ramblock(buffer.address, PAGE)
    expect(model, vm.rules.SET_RAM_SIZE, vm.set_ram2, 0, 0, buffer.address)
    expect(model, vm.rules.SET_RAM_SIZE, vm.set_ram2, 0, 0x800, buffer.address)


def test_mapping_lies_in_a_ramblock(model: Any, vm: RawVm) -> None:
    buffer = HostBuffer(2 * PAGE)
    vm.add_ramblock(buffer.address, PAGE)
    expect(model, vm.rules.SET_RAM_NO_BLOCK, vm.set_ram2, 0, PAGE, buffer.address + PAGE)
    # Stand-alone: no block needed, the mapping makes one.
    vm.set_ram2(0x10000, PAGE, buffer.address + PAGE, b.HAX_RAM_INFO_STANDALONE)


def test_unknown_vcpu_request(model: Any, vm: RawVm) -> None:
    vcpu = vm.vcpu()
    unknown = 0x40002000 | 0x999 << 2 if model.host_os == "win32" else 0xC00400FE
    with pytest.raises(HypervisorError) as info:
        model_call(model, vcpu.handle, unknown, address_of(ffi.new("uint32_t *")), 4)
    assert info.value.code == vm.rules.UNKNOWN_VCPU_REQUEST.errno
    assert model.last_rejection.rule is vm.rules.UNKNOWN_VCPU_REQUEST


def test_unknown_vm_request_is_ignored_on_posix(model: Any, vm: RawVm) -> None:
    """Linux/macOS: the VM device's default case returns 0; Windows refuses."""
    unknown = 0x40002000 | 0x999 << 2 if model.host_os == "win32" else 0xC00400FE
    arg = address_of(ffi.new("uint32_t *"))
    if model.host_os == "win32":
        with pytest.raises(HypervisorError) as info:
            model_call(model, vm.handle, unknown, arg, 4)
        assert info.value.code == W_UNKNOWN_VM_REQUEST.errno
        assert model.last_rejection.rule is W_UNKNOWN_VM_REQUEST, "HaxVmControl's default case"
    else:
        assert model_call(model, vm.handle, unknown, arg, 4) == 0
        assert model.last_rejection is None


def test_protect_ram_is_a_model_gap(model: Any, vm: RawVm) -> None:
    """Every host's driver handles PROTECT_RAM (hax_vm_protect_ram); the model does not."""
    from pyvmm.testing.driver_model import ModelGap

    info = ffi.new("struct hax_protect_ram_info *", {"pa_start": 0, "size": 0x1000, "flags": 0})
    with pytest.raises(ModelGap, match="PROTECT_RAM"):
        vm.control("PROTECT_RAM", info)


def model_call(model: Any, handle: int, request: int, address: int, size: int) -> int:
    """One request with a raw number, through the model's seam."""
    if model.host_os != "win32":
        result = int(model.ioctl(handle, request, address))
        if result < 0:
            raise HypervisorError(f"ioctl {request:#x}", -result)
        return result
    returned = ffi.new("uint32_t *")
    ok = model.function("DeviceIoControl")(handle, request, address, size, address, size, address_of(returned), None)
    if not ok:
        from pyvmm.errors import ErrorSpace

        raise HypervisorError(f"control {request:#x}", model.last_error(), space=ErrorSpace.WIN32)
    return 0


def test_vm_requests_from_another_process_are_advised(model: Any, vm: RawVm) -> None:
    buffer = HostBuffer(PAGE)
    with model.foreign_process():
        vm.add_ramblock(buffer.address, PAGE)  # the driver does not refuse it
    assert model.last_rejection.rule is vm.rules.VM_FOREIGN_PROCESS
    del model.rejections[:]


def test_vcpu_requests_from_another_thread_are_advised(model: Any, vm: RawVm) -> None:
    vcpu = vm.vcpu()
    failures: list[BaseException] = []

    def other() -> None:
        try:
            vcpu.get_state()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            failures.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert not failures
    assert model.last_rejection.rule is vm.rules.VCPU_FOREIGN_THREAD
    del model.rejections[:]
    vcpu.get_state()  # its own thread: no advice
    assert model.last_rejection is None


def test_bad_pointer(model: Any, vm: RawVm) -> None:
    vcpu = vm.vcpu()
    rule = BAD_BUFFER if model.host_os == "win32" else EFAULT_RULE
    with pytest.raises(HypervisorError) as info:
        model_call(model, vcpu.handle, vcpu.channel.requests.GET_REGS, 8, 512)
    assert info.value.code == rule.errno
    assert model.last_rejection.rule is rule


# --- Windows only: DeviceIoControl's buffers ------------------------------------------------


@pytest.fixture
def windows() -> Any:
    model = HaxmWindowsModel()
    with model.installed():
        yield model
    model.close_all()


def _control(model: HaxmWindowsModel, handle: int, code: int, in_size: int, out_size: int) -> tuple[int, int]:
    buffer = ffi.new("uint8_t[]", 1024)
    returned = ffi.new("uint32_t *")
    address = address_of(buffer)
    ok = model.function("DeviceIoControl")(
        handle, code, address, in_size, address, out_size, address_of(returned), None
    )
    return int(ok), model.last_error()


def test_windows_short_buffers(windows: HaxmWindowsModel) -> None:
    vm = RawVm()
    try:
        vcpu = vm.vcpu()
        requests = b.WINDOWS
        for handle, code, in_size, out_size in (
            (vcpu.handle, requests.GET_REGS, 0, 511),
            (vcpu.handle, requests.SET_REGS, 511, 0),
            (vcpu.handle, requests.SETUP_TUNNEL, 0, 23),
            (vcpu.handle, requests.INTERRUPT, 3, 0),
            (vcpu.handle, requests.SET_MSRS, 520, 519),
            (vm.handle, requests.SET_RAM2, 39, 0),
            (vm.system, requests.VERSION, 0, 7),
        ):
            ok, error = _control(windows, handle, code, in_size, out_size)
            assert (ok, error) == (0, W_SHORT_BUFFER.errno)
            assert windows.last_rejection.rule is W_SHORT_BUFFER
    finally:
        vm.close()


def test_windows_create_vm_buffer(windows: HaxmWindowsModel) -> None:
    system = windows.function("CreateFileW")(r"\\.\HAX")
    ok, error = _control(windows, system, b.WINDOWS.CREATE_VM, 0, 2)
    assert (ok, error) == (0, W_CREATE_VM_BUFFER.errno)
    assert windows.last_rejection.rule is W_CREATE_VM_BUFFER
    assert not windows.driver.vms, "no VM was made"
    windows.function("CloseHandle")(system)


def test_windows_unknown_system_control(windows: HaxmWindowsModel) -> None:
    system = windows.function("CreateFileW")(r"\\.\HAX")
    ok, error = _control(windows, system, b.WINDOWS.RUN, 0, 0)
    assert (ok, error) == (0, W_UNKNOWN_SYSTEM_REQUEST.errno)
    assert windows.last_rejection.rule is W_UNKNOWN_SYSTEM_REQUEST
    windows.function("CloseHandle")(system)


def test_capability_code_is_notify_on_a_vm_handle(windows: HaxmWindowsModel) -> None:
    """Windows 0x910 is CAPABILITY on ``\\\\.\\HAX`` and NOTIFY_QEMU_VERSION on a VM."""
    vm = RawVm(notify=None)
    try:
        info = ffi.new("struct hax_capabilityinfo *")
        vm.channel.control(vm.system, "CAPABILITY", info, OUT)
        assert info.wstatus & b.HAX_CAP_STATUS_WORKING
        assert windows.driver.vms[vm.vm_id].features == 0
        version = ffi.new("struct hax_qemu_version *", {"cur_version": 4, "least_version": 4})
        vm.control("CAPABILITY", version)
        assert windows.driver.vms[vm.vm_id].features == 3, "VM_FEATURES_FASTMMIO_BASIC | _EXTRA"
    finally:
        vm.close()
