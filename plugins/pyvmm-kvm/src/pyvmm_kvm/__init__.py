"""pyvmm backend for Linux KVM.

- :mod:`pyvmm_kvm.bindings`: cffi declarations and constants from ``<linux/kvm.h>``
- :mod:`pyvmm_kvm.host`: the OS seam (open, ioctl, mmap)
- :mod:`pyvmm_kvm.system`, :mod:`pyvmm_kvm.vm`, :mod:`pyvmm_kvm.vcpu`: /dev/kvm, VMs, vCPUs
- :mod:`pyvmm_kvm.hooks`: the pyvmm hook implementations
"""

__version__ = "0.1.0"
