"""The GenieZone backend's plugin object, which :mod:`pyvmm_geniezone.manifest` (the entry point ``geniezone``) names.

The hooks are the methods of :class:`~pyvmm_geniezone.vm.GenieZoneVm` and
:class:`~pyvmm_geniezone.vcpu.GenieZoneVcpu`; :func:`pyvmm.backend.backend_plugin`
generates the pluggy implementations that forward to them.

What is declared, and what is not (``docs/backends/geniezone.md`` §8):

* registers are set (``pyvmm_init_vcpu``) but never read: ``GZVM_GET_ONE_REG``
  always fails, so no ``VCPU_REGISTERS``;
* no read-only or dirty-logged memory, no memory removal, no late memory: the
  driver has one kind of slot, registered once;
* no port I/O and no ``PIO_IOEVENTS``: the driver refuses PIO ioeventfds;
* irqfds are edge-triggered only: the driver accepts ``RESAMPLE`` but never
  lowers the line nor signals the resample fd, so no ``IRQFD_RESAMPLE``;
* ``PROTECTED`` where ``GZVM_CHECK_EXTENSION(GZVM_CAP_PROTECTED_VM)`` says so
  (the probe narrows the manifest otherwise).
"""

from __future__ import annotations

from pyvmm.backend import backend_plugin
from pyvmm_geniezone.manifest import CAPABILITIES, manifest
from pyvmm_geniezone.vcpu import GenieZoneVcpu
from pyvmm_geniezone.vm import GenieZoneVm

__all__ = ["CAPABILITIES", "manifest", "plugin"]

plugin = backend_plugin(manifest=manifest, create_vm=GenieZoneVm.create, vm_class=GenieZoneVm, vcpu_class=GenieZoneVcpu)
