"""pyvmm backend for Gunyah (Qualcomm), ``/dev/gunyah`` on aarch64 Linux.

- :mod:`pyvmm_gunyah.bindings`: cffi declarations and constants of the Gunyah uapi (ABI B)
- :mod:`pyvmm_gunyah.host`: the OS seam (open, ioctl, mmap, eventfd, kick signal) and its test switch
- :mod:`pyvmm_gunyah.system`: ``/dev/gunyah`` and the probe of which Gunyah interface it speaks
- :mod:`pyvmm_gunyah.vm`, :mod:`pyvmm_gunyah.vcpu`: VMs and vCPUs
- :mod:`pyvmm_gunyah.hooks`: the pyvmm hook implementations
"""

__version__ = "0.1.0"
