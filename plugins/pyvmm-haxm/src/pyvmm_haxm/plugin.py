"""The HAXM backend's plugin object, which :mod:`pyvmm_haxm.manifest` (the entry point ``haxm``) names.

The hooks themselves are the methods of :class:`~pyvmm_haxm.vm.HaxmVm` and
:class:`~pyvmm_haxm.vcpu.HaxmVcpu`; :func:`pyvmm.backend.backend_plugin`
generates the pluggy implementations that forward to them.
"""

from __future__ import annotations

from pyvmm.backend import backend_plugin
from pyvmm_haxm.manifest import CAPABILITIES, manifest
from pyvmm_haxm.vcpu import HaxmVcpu
from pyvmm_haxm.vm import HaxmVm

__all__ = ["CAPABILITIES", "manifest", "plugin"]

plugin = backend_plugin(manifest=manifest, create_vm=HaxmVm.create, vm_class=HaxmVm, vcpu_class=HaxmVcpu)
