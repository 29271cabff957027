"""pyvmm backend for MediaTek GenieZone, ``/dev/gzvm`` on aarch64 Linux.

Built on the backend kit (:mod:`pyvmm.backend`):

- :mod:`pyvmm_geniezone.bindings`: cffi declarations, constants and ioctl numbers
  of ``include/uapi/linux/gzvm.h``, and the ioctl name table
- :mod:`pyvmm_geniezone.host`: ``HOST``, the kit's seam switch with GenieZone's ioctl names
- :mod:`pyvmm_geniezone.system`: ``/dev/gzvm`` and the probe of the interface it speaks
- :mod:`pyvmm_geniezone.vma`: making a guest-RAM region exactly one host VMA,
  which the driver requires of every memory slot
- :mod:`pyvmm_geniezone.vm`, :mod:`pyvmm_geniezone.vcpu`: the VM and vCPU classes,
  whose methods are the backend's hooks
- :mod:`pyvmm_geniezone.plugin`: the manifest and the plugin object (entry point ``geniezone``)
- :mod:`pyvmm_geniezone.model`: the driver model the tests (and ``pyvmm run --model``) run on

The interface facts the code relies on, with their sources, are in
``docs/backends/geniezone.md``.
"""

__version__ = "0.1.0"
