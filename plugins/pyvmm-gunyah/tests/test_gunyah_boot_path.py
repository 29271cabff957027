"""The boot path through core, end to end: one BootSpec, two kinds of backend.

On Gunyah the hypervisor owns the vCPU registers (crosvm's
``HypervisorInitializedBootContext``): the entry and the device tree reach it
through ``pyvmm_set_boot_context`` + ``pyvmm_start_vm``, and nothing ever touches
a vCPU register -- there is no ioctl that could.  A KVM-style backend given the
same BootSpec gets the registers through ``pyvmm_init_vcpu`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gunyah_guests as guests
import pytest
from conftest import make_backend

from pyvmm.arch.aarch64 import PC_ID, x_reg_id
from pyvmm.boot import Aarch64VcpuInit, BootSpec
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.errors import UnsupportedCapability
from pyvmm.exits import MmioExit, SystemEvent, SystemEventExit
from pyvmm.plugins import PluginRegistry
from pyvmm.testing.contract_backend import ContractTestBackend, InitVcpuCalled
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, BackendHooks
from pyvmm_gunyah import model as gm

SPEC = BootSpec(
    arch=Arch.AARCH64,
    entry=guests.CODE_ADDRESS,
    fdt_address=guests.FDT_ADDRESS,
    fdt_size=guests.FDT_SIZE,
    registers={"x1": 0x5EED},
)

#: Every request the Gunyah driver has (docs/backends/gunyah.md §3.1); anything else would be a name the
#: model does not know, logged as "ioctl 0x...".
GUNYAH_IOCTLS = {
    "GH_CREATE_VM",
    "GH_VM_SET_USER_MEM_REGION",
    "GH_VM_SET_DTB_CONFIG",
    "GH_VM_START",
    "GH_VM_ADD_FUNCTION",
    "GH_VCPU_RUN",
    "GH_VCPU_MMAP_SIZE",
    "GH_VM_REMOVE_FUNCTION",
    "GH_VM_SET_BOOT_CONTEXT",
    "GH_VM_CHECK_EXTENSION",
}


def spy_on_hooks(backend: Backend) -> list[str]:
    """Record every hook core calls on ``backend`` (before any VM exists), and
    plant a tripwire where ``pyvmm_init_vcpu`` would be: registration gave Gunyah
    none, and core must never look it up.  Core resolves a backend's hooks once,
    when the :class:`Backend` is made, so they are resolved again from the spied
    implementations; the wrappers are no generated forwarders, so even ``run``
    goes through them instead of the vCPU handle's own method."""
    called: list[str] = []

    def wrap(name: str, impl: Callable[..., Any]) -> Callable[..., Any]:
        def hook(*args: Any) -> Any:
            called.append(name)
            return impl(*args)

        return hook

    impls = backend.plugin.impls
    assert "pyvmm_init_vcpu" not in impls
    for name, impl in list(impls.items()):
        impls[name] = wrap(name, impl)

    def tripwire(vcpu: Any, boot: Any) -> None:
        called.append("pyvmm_init_vcpu")
        raise InitVcpuCalled("core called pyvmm_init_vcpu on Gunyah")

    impls["pyvmm_init_vcpu"] = tripwire
    backend.hooks = BackendHooks(backend.plugin, backend.capabilities)
    return called


def test_gunyah_boots_without_touching_a_register(model: gm.GunyahModel) -> None:
    backend = make_backend()
    called = spy_on_hooks(backend)
    mark = len(model.calls)
    with backend.create_vm({"arch": "aarch64", "vcpus": 2}) as vm:
        vm.add_memory(guests.RAM_BASE, guests.RAM_SIZE)
        vm.memory.write(guests.CODE_ADDRESS, guests.REPORT_REGISTERS.code)
        guests.write_device_tree(vm)
        boot_vcpu, second = vm.create_vcpu(), vm.create_vcpu()
        vm.boot(SPEC)
        values = []
        for _ in range(3):
            exit_ = boot_vcpu.run()
            assert isinstance(exit_, MmioExit)
            values.append(int.from_bytes(exit_.data[: exit_.size], "little"))
        done = boot_vcpu.run()
        assert isinstance(done, SystemEventExit)
        assert done.event is SystemEvent.SHUTDOWN
        # What the guest saw came from the hypervisor: X0 = the DTB, X1 = the boot context.
        assert values[:2] == [guests.FDT_ADDRESS, 0x5EED]

        # The public API refuses register access outright.
        with pytest.raises(UnsupportedCapability):
            boot_vcpu.init(Aarch64VcpuInit(regs={PC_ID: 0}))
        with pytest.raises(UnsupportedCapability, match="VCPU_REGISTERS"):
            second.get_state(StateKind.CORE_REGS)

        state = model.vms[0]
        assert state.dtb == (guests.FDT_ADDRESS, guests.FDT_SIZE)
        assert state.boot_context[gm.REG_SET_PC << 8] == guests.CODE_ADDRESS

    assert "pyvmm_init_vcpu" not in called
    assert called.count("pyvmm_set_boot_context") == called.count("pyvmm_start_vm") == 1
    first_boot = called.index("pyvmm_set_boot_context")
    assert called[first_boot + 1] == "pyvmm_start_vm"
    assert max(i for i, name in enumerate(called) if name == "pyvmm_create_vcpu") < first_boot
    assert not {"pyvmm_get_vcpu_state", "pyvmm_set_vcpu_state"} & set(called)

    ioctls = [c.name for c in model.calls[mark:] if c.op == "ioctl"]
    assert set(ioctls) <= GUNYAH_IOCTLS, set(ioctls) - GUNYAH_IOCTLS
    boot_calls = [n for n in ioctls if n in ("GH_VM_SET_DTB_CONFIG", "GH_VM_SET_BOOT_CONTEXT", "GH_VM_START")]
    assert boot_calls == ["GH_VM_SET_DTB_CONFIG", "GH_VM_SET_BOOT_CONTEXT", "GH_VM_SET_BOOT_CONTEXT", "GH_VM_START"]
    model.assert_no_rejections()


def test_a_kvm_style_backend_gets_vcpu_init_from_the_same_spec() -> None:
    kvm_like = ContractTestBackend(
        "kvm-like", capabilities=(Capability.IMMEDIATE_EXIT, Capability.MULTI_VCPU), arches=(Arch.AARCH64,)
    )
    backend = Backend(PluginRegistry().register(kvm_like.plugin()))
    with backend.create_vm({"arch": "aarch64", "vcpus": 2}) as vm:
        vm.add_memory(guests.RAM_BASE, guests.RAM_SIZE)
        vm.create_vcpu()
        vm.create_vcpu()
        vm.boot(SPEC)
    names = kvm_like.hook_names()
    assert "pyvmm_set_boot_context" not in names
    inits = [call for call in kvm_like.calls if call[0] == "pyvmm_init_vcpu"]
    assert [call[1] for call in inits] == [0, 1]
    boot_init = inits[0][2]
    assert isinstance(boot_init, Aarch64VcpuInit)
    assert boot_init.regs[PC_ID] == guests.CODE_ADDRESS
    assert boot_init.regs[x_reg_id(0)] == guests.FDT_ADDRESS
    assert boot_init.regs[x_reg_id(1)] == 0x5EED
    secondary = inits[1][2]
    assert isinstance(secondary, Aarch64VcpuInit)
    assert (secondary.boot_cpu, secondary.power_off) == (False, True)
