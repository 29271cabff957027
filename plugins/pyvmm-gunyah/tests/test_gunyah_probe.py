"""Which Gunyah interface the driver speaks, and refusing the ones pyvmm-gunyah
does not (``docs/backends/gunyah.md`` §2.1, §2.3)."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
from conftest import make_backend

from pyvmm.backend import LibcDeviceSeam
from pyvmm.errors import BackendUnavailable, HypervisorError
from pyvmm.vm import get_backend
from pyvmm_gunyah.host import HOST
from pyvmm_gunyah.model import GunyahModel
from pyvmm_gunyah.system import Abi, GunyahSystem, UnsupportedAbi, system

PROBE_IOCTLS = ["GH_CREATE_VM", "GH_VM_SET_BOOT_CONTEXT", "GH_VM_SET_USER_MEM_REGION", "GH_VM_CHECK_EXTENSION"]


def _ioctl_names(model: GunyahModel) -> list[str]:
    return [c.name for c in model.calls if c.op == "ioctl"]


def test_abi_b_is_available_and_the_probe_breaks_no_rule(model: GunyahModel) -> None:
    availability = make_backend().availability()
    assert availability.available, availability.reason
    gunyah = system()
    assert gunyah.abi.abi is Abi.B
    assert gunyah.abi.timer_wakeup is True
    assert _ioctl_names(model) == PROBE_IOCTLS
    model.assert_no_rejections()
    # The scratch VM is gone; only /dev/gunyah itself stays open, for later VMs.
    assert [f.kind for f in model.open_fds()] == ["gunyah"]
    assert model.vms == []


def test_timer_wakeup_answer_is_kept() -> None:
    with GunyahModel(timer_wakeup=False).installed():
        assert system().abi.timer_wakeup is False


def test_abi_b_without_check_extension_is_still_b() -> None:
    # The ACK android15 vm_mgr.c has everything crosvm uses but CHECK_EXTENSION.
    fresh = GunyahModel(check_extension=False)
    with fresh.installed():
        availability = make_backend().availability()
        assert availability.available, availability.reason
        assert system().abi.timer_wakeup is None
    (rejection,) = fresh.rejections
    assert rejection.call.name == "GH_VM_CHECK_EXTENSION"
    assert rejection.rule.errno == errno.ENOTTY


@pytest.mark.parametrize(
    ("abi", "telltale", "words"),
    [
        ("A", "GH_VM_SET_BOOT_CONTEXT", ["ABI A", "android14-6.1", "GH_VM_SET_BOOT_CONTEXT gives ENOTTY"]),
        ("C", "GH_VM_SET_USER_MEM_REGION", ["ABI C", "guest_memfd", "GH_VM_SET_USER_MEM_REGION gives ENOTTY"]),
    ],
)
def test_other_abis_are_refused_with_what_was_found(abi: str, telltale: str, words: list[str]) -> None:
    fresh = GunyahModel(abi=abi)
    with fresh.installed():
        availability = make_backend().availability()
        assert not availability.available
        for word in words:
            assert word in availability.reason
        assert "needs the android15+/Qualcomm interface (ABI B)" in availability.reason
        with pytest.raises(UnsupportedAbi) as caught:
            system()
        assert caught.value.abi is Abi(abi)
    # The probe stopped at the ioctl that told the ABI apart, and left nothing open.
    assert [r.call.name for r in fresh.rejections][-1] == telltale
    assert fresh.open_fds() == []


def test_refused_abi_cannot_create_a_vm() -> None:
    with GunyahModel(abi="A").installed():
        backend = make_backend()
        with pytest.raises(UnsupportedAbi, match="ABI A"):
            backend.create_vm({"arch": "aarch64"})


def test_selecting_a_refused_abi_by_name_says_why() -> None:
    with GunyahModel(abi="C").installed(), pytest.raises(BackendUnavailable, match="ABI C"):
        get_backend("gunyah")


def test_no_device_node() -> None:
    fresh = GunyahModel()
    fresh.devices.clear()
    with fresh.installed():
        availability = make_backend().availability()
    assert not availability.available
    assert "/dev/gunyah does not exist" in availability.reason


@pytest.mark.skipif(os.path.exists("/dev/gunyah"), reason="this host has a real /dev/gunyah")
def test_real_seam_on_this_host_reports_no_device() -> None:
    with HOST.use(LibcDeviceSeam()):
        availability = make_backend().availability()
    assert not availability.available
    assert "/dev/gunyah does not exist" in availability.reason


def test_the_probed_device_is_shared_per_host(model: GunyahModel) -> None:
    host = HOST.current()
    gunyah = system()
    assert host.state["system"] is gunyah
    assert isinstance(gunyah, GunyahSystem)
    assert system() is gunyah
    assert _ioctl_names(model).count("GH_CREATE_VM") == 1  # probed once
    with GunyahModel().installed() as other:
        assert system() is not gunyah
        assert system().host is HOST.current() is not host
        assert other.calls
    assert system() is gunyah


@pytest.mark.parametrize("abi", [Abi.A, Abi.C])
def test_unsupported_abi_survives_pickling(abi: Abi) -> None:
    error = UnsupportedAbi("/dev/gunyah", abi)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is UnsupportedAbi
    assert isinstance(copy, HypervisorError)
    assert copy.abi is abi
    assert copy.path == "/dev/gunyah"
    assert str(copy) == str(error)
    assert f"ABI {abi.value}" in str(copy)
    assert (copy.errno, copy.operation, copy.detail) == (errno.ENOTTY, "Gunyah interface probe", error.detail)


def test_unsupported_abi_raised_by_the_probe_survives_pickling() -> None:
    with GunyahModel(abi="C").installed(), pytest.raises(UnsupportedAbi) as caught:
        system()
    copy = pickle.loads(pickle.dumps(caught.value))
    assert copy.abi is Abi.C
    assert str(copy) == str(caught.value)
