"""CPUID and MSR exits through pyvmm's public API on the model: the
``backend_options`` that enable them, a guest executing CPUID, RDMSR and
WRMSR, the VMM answering, and RIP moved past each instruction by the plugin."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.errors import ConfigError
from pyvmm.exits import CpuidExit, ExitKind, IoExit, MsrAccessExit
from pyvmm.vm import Backend, Vcpu
from pyvmm_whpx.model import WhpxModel

CODE, STACK, RAM = 0x10_0000, 0x8_0000, 0x20_0000
#: mov eax, 1 / xor ecx, ecx / cpuid / out 0x10, eax / mov eax, ebx / out 0x10, eax /
#: mov ecx, 0x1234 / rdmsr / out 0x10, eax / mov eax, 0x55 / mov edx, 0x66 / wrmsr (+34) / hlt
GUEST = bytes.fromhex("b80100000031c90fa2e71089d8e710b9341200000f32e710b855000000ba660000000f30f4")


@contextmanager
def booted(backend: Backend, options: dict[str, Any]) -> Iterator[Vcpu]:
    with backend.create_vm({"arch": "x86_64", "backend_options": options}) as vm:
        vm.add_memory(0, RAM)
        vm.memory.write(CODE, GUEST)
        vcpu = vm.create_vcpu()
        vm.boot(BootSpec(arch=vm.config.arch, entry=CODE, stack=STACK, x86_mode=X86Mode.LONG))
        yield vcpu


def out(vcpu: Vcpu) -> int:
    exit_ = vcpu.run()
    assert isinstance(exit_, IoExit) and exit_.port == 0x10, exit_
    return int(struct.unpack("<I", bytes(exit_.data[:4]))[0])


def test_the_vmm_answers_cpuid_rdmsr_and_wrmsr(whpx: Backend, model: WhpxModel) -> None:
    with booted(whpx, {"cpuid_exits": True, "msr_exits": True}) as vcpu:
        cpuid = vcpu.run()
        assert isinstance(cpuid, CpuidExit) and (cpuid.function, cpuid.index) == (1, 0)
        assert cpuid.eax & 0xF00, "the hypervisor's default answer: a signature with a family"
        assert vcpu.get_regs().rip == CODE + 7, "before the instruction"
        cpuid.eax, cpuid.ebx, cpuid.ecx, cpuid.edx = 0xAAAA, 0xBBBB, 0xCCCC, 0xDDDD
        assert (out(vcpu), out(vcpu)) == (0xAAAA, 0xBBBB), "the answer, and RIP past the CPUID"
        read = vcpu.run()
        assert isinstance(read, MsrAccessExit) and (read.index, read.is_write) == (0x1234, False)
        read.value = 0x77
        assert out(vcpu) == 0x77
        write = vcpu.run()
        assert isinstance(write, MsrAccessExit) and write.is_write and write.value == 0x66_0000_0055
        assert vcpu.run().kind is ExitKind.HLT
        assert vcpu.get_regs().rip == CODE + 37, "past the WRMSR and the HLT"
    set_up = [c for c in model.calls if c.name in ("WHvSetPartitionProperty", "WHvSetupPartition")]
    assert [c.name for c in set_up][-1] == "WHvSetupPartition", "the exits are set before setup"
    assert model.rejections == []


def test_a_refused_msr_is_an_error_and_the_access_exits_again(whpx: Backend) -> None:
    with booted(whpx, {"msr_exits": True}) as vcpu:
        out(vcpu)
        out(vcpu)
        read = vcpu.run()
        assert isinstance(read, MsrAccessExit)
        read.error = True
        with pytest.raises(ConfigError, match=r"MsrAccessExit.error for MSR 0x1234"):
            vcpu.run()
        again = vcpu.run()
        assert isinstance(again, MsrAccessExit) and again.index == 0x1234 and not again.is_write
        assert vcpu.get_regs().rip == CODE + 20, "nothing was completed"


def test_without_the_options_cpuid_and_msrs_do_not_exit(whpx: Backend) -> None:
    with booted(whpx, {}) as vcpu:
        assert out(vcpu) & 0xF00, "the hypervisor answered CPUID itself"
        out(vcpu)
        out(vcpu)
        assert vcpu.run().kind is ExitKind.HLT


def test_cpuid_results_answer_their_function_without_an_exit(whpx: Backend) -> None:
    result = {"function": 1, "eax": 0x1111, "ebx": 0x2222, "ecx": 0, "edx": 0}
    with booted(whpx, {"cpuid_results": [result], "msr_exits": True}) as vcpu:
        assert (out(vcpu), out(vcpu)) == (0x1111, 0x2222)
        assert isinstance(vcpu.run(), MsrAccessExit)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cpuid_exits": 1}, "true or false"),
        ({"cpuid_results": {"function": 1}}, "a list"),
        ({"cpuid_results": [{"function": 1, "eax": 0}]}, "exactly"),
        ({"cpuid_results": [{"function": 1, "eax": -1, "ebx": 0, "ecx": 0, "edx": 0}]}, "32-bit"),
        ({"cpuid_results": [dict.fromkeys(("function", "eax", "ebx", "ecx", "edx"), 0)] * 2}, "twice"),
        ({"rdtsc_exits": True}, "unknown whpx option"),
    ],
)
def test_bad_options_are_refused_before_a_partition_exists(
    whpx: Backend, model: WhpxModel, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        whpx.create_vm({"arch": "x86_64", "backend_options": options})
    assert model.partitions == {}


def test_an_exit_this_windows_does_not_offer_is_refused() -> None:
    from pyvmm.plugins import PluginRegistry
    from pyvmm_whpx.plugin import plugin

    with WhpxModel(extended_exits=False).installed() as model:
        backend = Backend(PluginRegistry().register(plugin))
        with pytest.raises(ConfigError, match="offers no such exit"):
            backend.create_vm({"arch": "x86_64", "backend_options": {"msr_exits": True}})
        assert model.partitions == {}
