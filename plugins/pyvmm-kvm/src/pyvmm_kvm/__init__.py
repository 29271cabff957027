"""pyvmm backend for Linux KVM, built on the backend kit (:mod:`pyvmm.backend`).

- :mod:`pyvmm_kvm.bindings`: cffi declarations and constants from ``<linux/kvm.h>``
- :mod:`pyvmm_kvm.host`: the OS seam (the kit's libc seam, KVM's ioctl names, the test switch)
- :mod:`pyvmm_kvm.system`, :mod:`pyvmm_kvm.vm`, :mod:`pyvmm_kvm.vcpu`: /dev/kvm, VMs, vCPUs;
  the VM's and vCPU's methods are the backend's hooks
- :mod:`pyvmm_kvm.plugin`: the manifest and the plugin object (entry point ``kvm``)

Interface notes: ``docs/backends/kvm.md``.
"""

__version__ = "0.1.0"
