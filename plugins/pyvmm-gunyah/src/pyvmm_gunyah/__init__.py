"""pyvmm backend for Gunyah (Qualcomm), ``/dev/gunyah`` on aarch64 Linux.

Built on the backend kit (:mod:`pyvmm.backend`), as every pyvmm backend is:

- :mod:`pyvmm_gunyah.bindings`: cffi declarations, constants and ioctl numbers of
  the Gunyah uapi (ABI B), and the ioctl name table
- :mod:`pyvmm_gunyah.host`: ``HOST``, the kit's seam switch with Gunyah's ioctl names
- :mod:`pyvmm_gunyah.system`: ``/dev/gunyah`` and the probe of which Gunyah interface it speaks
- :mod:`pyvmm_gunyah.vm`, :mod:`pyvmm_gunyah.vcpu`: the VM and vCPU classes, whose
  methods are the backend's hooks
- :mod:`pyvmm_gunyah.devicetree`: ``/gunyah-vm-config`` and the doorbell nodes
  the resource manager reads from the guest's device tree
- :mod:`pyvmm_gunyah.plugin`: the manifest and the plugin object (entry point ``gunyah``)

The interface facts the code relies on are in ``docs/backends/gunyah.md``.
"""

__version__ = "0.1.0"
