"""HypervisorError carries a code with its space and a readable name (issue 9, point 4)."""

from __future__ import annotations

import errno

import pytest

from pyvmm.errors import (
    HRESULTS,
    NTSTATUSES,
    ErrorSpace,
    HypervisorError,
    PyvmmError,
    UnknownExitError,
    describe_code,
    hresult_from_win32,
    win32_from_hresult,
)


def test_the_errno_call_form_is_unchanged() -> None:
    error = HypervisorError("KVM_CREATE_VM", errno.EINVAL, "type 0")
    assert str(error) == "KVM_CREATE_VM failed: [EINVAL] Invalid argument (type 0)"
    assert (error.operation, error.code, error.space, error.code_name) == (
        "KVM_CREATE_VM",
        errno.EINVAL,
        ErrorSpace.ERRNO,
        "EINVAL",
    )
    assert error.errno == errno.EINVAL
    assert error.winerror is None
    assert error.detail == "type 0"
    assert isinstance(error, OSError)
    assert isinstance(error, PyvmmError)
    with pytest.raises(OSError, match=r"\[EINVAL\]") as info:
        raise error
    assert info.value.errno == errno.EINVAL


def test_whpx_hresult() -> None:
    error = HypervisorError("WHvCreatePartition", 0x80070057, space=ErrorSpace.HRESULT)
    assert error.code == 0x80070057
    assert error.code_name == "E_INVALIDARG"
    assert error.errno is None  # not an errno: except-OSError code must not read one
    assert error.winerror == 87  # E_INVALIDARG is HRESULT_FROM_WIN32(ERROR_INVALID_PARAMETER)
    assert (
        str(error) == "WHvCreatePartition failed: [E_INVALIDARG] One or more arguments are invalid (HRESULT 0x80070057)"
    )


def test_a_negative_hresult_from_ctypes_is_stored_unsigned() -> None:
    """ctypes returns an HRESULT as a signed LONG."""
    error = HypervisorError("WHvGetVirtualProcessorRegisters", -2143878391, space=ErrorSpace.HRESULT)
    assert error.code == 0x8037_0309
    assert error.code_name == "WHV_E_INVALID_VP_REGISTER_NAME"
    assert error.winerror is None


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (0x8037_0300, "WHV_E_UNKNOWN_CAPABILITY"),
        (0x8037_0301, "WHV_E_INSUFFICIENT_BUFFER"),
        (0x8037_0302, "WHV_E_UNKNOWN_PROPERTY"),
        (0x8037_0303, "WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG"),
        (0x8037_0304, "WHV_E_INVALID_PARTITION_CONFIG"),
        (0x8037_0305, "WHV_E_GPA_RANGE_NOT_FOUND"),
        (0x8037_0306, "WHV_E_VP_ALREADY_EXISTS"),
        (0x8037_0307, "WHV_E_VP_DOES_NOT_EXIST"),
        (0x8037_0308, "WHV_E_INVALID_VP_STATE"),
        (0x8037_0309, "WHV_E_INVALID_VP_REGISTER_NAME"),
        (0x8000_4001, "E_NOTIMPL"),
        (0x8000_4005, "E_FAIL"),
        (0x8000_FFFF, "E_UNEXPECTED"),
        (0x8000_000A, "E_PENDING"),
        (0x8007_0005, "E_ACCESSDENIED"),
        (0x8007_000E, "E_OUTOFMEMORY"),
        (0x8007_0002, "HRESULT_FROM_WIN32(ERROR_FILE_NOT_FOUND)"),
        (0x8007_007F, "HRESULT_FROM_WIN32(ERROR_PROC_NOT_FOUND)"),
    ],
)
def test_hresult_names(code: int, name: str) -> None:
    error = HypervisorError("WHvSomething", code, space=ErrorSpace.HRESULT)
    assert error.code_name == name
    assert f"[{name}]" in str(error)
    assert f"HRESULT 0x{code:08X}" in str(error)


def test_the_tables_hold_distinct_names() -> None:
    for table in (HRESULTS, NTSTATUSES):
        names = [name for name, _ in table.values()]
        assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (0xC000_0001, "STATUS_UNSUCCESSFUL"),
        (0xC000_000D, "STATUS_INVALID_PARAMETER"),
        (0xC000_0017, "STATUS_NO_MEMORY"),
        (0xC000_0022, "STATUS_ACCESS_DENIED"),
        (-1073741811, "STATUS_INVALID_PARAMETER"),  # signed, as a driver's NTSTATUS is
    ],
)
def test_ntstatus_names(code: int, name: str) -> None:
    error = HypervisorError("HAX_IOCTL_VCPU_RUN", code, space=ErrorSpace.NTSTATUS)
    assert error.code_name == name
    assert error.code == code & 0xFFFF_FFFF
    assert error.errno is None
    assert error.winerror is None


def test_win32_error() -> None:
    error = HypervisorError("CreateEventW", 8, "an event", space=ErrorSpace.WIN32)
    assert error.code_name == "ERROR_NOT_ENOUGH_MEMORY"
    assert error.winerror == 8
    assert error.errno is None  # 8 is ENOEXEC as an errno: it must not read as one
    assert str(error) == (
        "CreateEventW failed: [ERROR_NOT_ENOUGH_MEMORY] Not enough memory resources are available to process "
        "this command (Win32 8) (an event)"
    )


@pytest.mark.parametrize(
    ("space", "code", "name", "text"),
    [
        (ErrorSpace.HRESULT, 0x8037_1234, "0x80371234", "op failed: HRESULT 0x80371234 (unknown HRESULT)"),
        (ErrorSpace.NTSTATUS, 0xC0DE_0001, "0xC0DE0001", "op failed: NTSTATUS 0xC0DE0001 (unknown NTSTATUS)"),
        (ErrorSpace.WIN32, 54321, "54321", "op failed: Win32 54321 (unknown Win32 error)"),
        (ErrorSpace.ERRNO, 4321, "4321", "op failed: [4321] Unknown error 4321"),
    ],
)
def test_unknown_codes_fall_back_to_their_value(space: ErrorSpace, code: int, name: str, text: str) -> None:
    error = HypervisorError("op", code, space=space)
    assert error.code_name == name
    assert str(error) == text


def test_space_given_by_value() -> None:
    assert HypervisorError("op", 5, space="Win32").space is ErrorSpace.WIN32  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'ntstatus' is not a valid ErrorSpace"):
        HypervisorError("op", 5, space="ntstatus")  # type: ignore[arg-type]


def test_hresult_from_win32_and_back() -> None:
    """winerror.h: ``HRESULT_FROM_WIN32(x)`` is ``(x & 0xFFFF) | (FACILITY_WIN32 << 16) | 0x80000000``."""
    assert hresult_from_win32(87) == 0x8007_0057
    assert hresult_from_win32(0) == 0
    assert win32_from_hresult(0x8007_0057) == 87
    assert win32_from_hresult(-2147024809) == 87
    assert win32_from_hresult(0x8037_0300) is None
    assert win32_from_hresult(0x0007_0057) is None  # not a failure


def test_describe_code() -> None:
    assert describe_code(errno.ENOTTY, ErrorSpace.ERRNO) == ("ENOTTY", "Inappropriate ioctl for device")
    assert describe_code(0x8007_0057, ErrorSpace.HRESULT)[0] == "E_INVALIDARG"
    assert describe_code(1 << 70, ErrorSpace.ERRNO)[1] == "Unknown error"  # os.strerror would overflow


def test_unknown_exit_error_is_an_errno_error() -> None:
    error = UnknownExitError("KVM_RUN", 9999)
    assert (error.reason, error.errno, error.space, error.code_name) == (9999, errno.EPROTO, ErrorSpace.ERRNO, "EPROTO")
    assert "unknown exit reason 9999" in str(error)
