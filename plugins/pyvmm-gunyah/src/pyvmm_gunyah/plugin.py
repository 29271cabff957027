"""The Gunyah backend's plugin object, which :mod:`pyvmm_gunyah.manifest` (the entry point ``gunyah``) names.

The hooks themselves are the methods of :class:`~pyvmm_gunyah.vm.GunyahVm` and
:class:`~pyvmm_gunyah.vcpu.GunyahVcpu`; :func:`pyvmm.backend.backend_plugin`
generates the pluggy implementations that forward to them.

The hypervisor owns the vCPU registers, so this backend declares
``HYPERVISOR_INITIALIZED_BOOT_CONTEXT`` and its vCPU class has no ``init`` method
(hence no ``pyvmm_init_vcpu``) and no register methods at all: the boot entry goes
to :meth:`GunyahVm.set_boot_context <pyvmm_gunyah.vm.GunyahVm.set_boot_context>`.
"""

from __future__ import annotations

from pyvmm.backend import backend_plugin
from pyvmm_gunyah.manifest import CAPABILITIES, manifest
from pyvmm_gunyah.vcpu import GunyahVcpu
from pyvmm_gunyah.vm import GunyahVm

__all__ = ["CAPABILITIES", "manifest", "plugin"]

plugin = backend_plugin(manifest=manifest, create_vm=GunyahVm.create, vm_class=GunyahVm, vcpu_class=GunyahVcpu)
