"""The KVM backend's plugin object, which :mod:`pyvmm_kvm.manifest` (the entry
point ``kvm``) names: core imports it when the backend is first used.

The hooks themselves are the methods of :class:`~pyvmm_kvm.vm.KvmVm` and
:class:`~pyvmm_kvm.vcpu.KvmVcpu`; :func:`pyvmm.backend.backend_plugin` generates
the pluggy implementations that forward to them.
"""

from __future__ import annotations

from pyvmm.backend import backend_plugin
from pyvmm_kvm.host_arch import host_is_arm64
from pyvmm_kvm.manifest import CAPABILITIES, manifest
from pyvmm_kvm.vcpu import KvmVcpu
from pyvmm_kvm.vm import KvmVm

__all__ = ["CAPABILITIES", "manifest", "plugin"]


def _plugin_for_this_host() -> object:
    """KVM runs guests of the host's architecture only: an arm64 host gets the
    arm64 backend (:mod:`pyvmm_kvm.arm64_plugin`, imported only there: it pulls
    in the virt board's layout), any other the x86 one above."""
    if host_is_arm64():
        from pyvmm_kvm.arm64_plugin import plugin as arm64

        return arm64
    return backend_plugin(manifest=manifest, create_vm=KvmVm.create, vm_class=KvmVm, vcpu_class=KvmVcpu)


plugin = _plugin_for_this_host()
