"""The WHPX backend's plugin object, which :mod:`pyvmm_whpx.manifest` (the entry point ``whpx``) names.

The hooks are the methods of :class:`~pyvmm_whpx.vm.WhpxVm` and
:class:`~pyvmm_whpx.vcpu.WhpxVcpu`; :func:`pyvmm.backend.backend_plugin`
generates the pluggy implementations that forward to them.

``host_os`` is Windows alone: the driver model (:mod:`pyvmm_whpx.model`,
``pyvmm run --model``) runs on other hosts because a stand-in behind the switch
lifts that limit (:mod:`pyvmm.backend.stand_in`).
"""

from __future__ import annotations

from pyvmm.backend import backend_plugin
from pyvmm_whpx.manifest import CAPABILITIES, manifest
from pyvmm_whpx.vcpu import WhpxVcpu
from pyvmm_whpx.vm import WhpxVm

__all__ = ["CAPABILITIES", "manifest", "plugin"]

plugin = backend_plugin(manifest=manifest, create_vm=WhpxVm.create, vm_class=WhpxVm, vcpu_class=WhpxVcpu)
