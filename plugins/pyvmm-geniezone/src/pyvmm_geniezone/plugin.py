"""The GenieZone backend's manifest and plugin object (entry point ``geniezone``).

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
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, BackendManifest
from pyvmm_geniezone import __version__
from pyvmm_geniezone.system import probe
from pyvmm_geniezone.vcpu import GenieZoneVcpu
from pyvmm_geniezone.vm import GenieZoneVm

CAPABILITIES = (
    Capability.USER_MEMORY,
    Capability.IMMEDIATE_EXIT,
    Capability.MULTI_VCPU,
    Capability.PROTECTED,
    Capability.IRQCHIP,
    Capability.IRQ_LINE,
    Capability.IRQFD,
    Capability.IRQFD_REMOVAL,
    Capability.IOEVENTS,
)


def manifest() -> BackendManifest:
    return BackendManifest(
        name="geniezone",
        version=__version__,
        contract_version=CONTRACT_VERSION,
        description="MediaTek GenieZone through /dev/gzvm (the Android Common Kernel interface crosvm drives)",
        host_os=("linux",),
        guest_arches=(Arch.AARCH64,),
        capabilities=CAPABILITIES,
        priority=85,
        probe=probe,
    )


plugin = backend_plugin(manifest=manifest, create_vm=GenieZoneVm.create, vm_class=GenieZoneVm, vcpu_class=GenieZoneVcpu)
