"""Run inside a test bed's guest: the KVM there is upstream KVM, usable by pyvmm.

These pass on any real KVM; they are the arm64 bed's own check until the KVM
backend runs arm64 guests (then ``plugins/pyvmm-kvm/tests`` join the selection)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.plugins import PluginRegistry
from pyvmm_kvm.plugin import plugin as kvm_plugin

KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00), include/uapi/linux/kvm.h
KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = 0xAE03  # _IO(KVMIO, 0x03)
KVM_CAP_USER_MEMORY = 3


@pytest.fixture
def dev_kvm() -> Iterator[int]:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def test_this_is_upstream_kvm_not_the_software_one() -> None:
    assert Path("/sys/module/kvm").is_dir()
    assert not Path("/sys/module/kvm_pvm").exists()


def test_dev_kvm_speaks_the_stable_api(dev_kvm: int) -> None:
    assert fcntl.ioctl(dev_kvm, KVM_GET_API_VERSION) == 12
    assert fcntl.ioctl(dev_kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) == 1


def test_a_vm_can_be_created(dev_kvm: int) -> None:
    vm = fcntl.ioctl(dev_kvm, KVM_CREATE_VM, 0)
    assert vm >= 0
    os.close(vm)


def test_pyvmm_finds_kvm_usable() -> None:
    availability = PluginRegistry().register(kvm_plugin).availability()
    assert availability.available, availability.reason
