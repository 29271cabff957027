"""pyvmm backend for Intel HAXM -- a **legacy** backend.

Intel archived HAXM (the Hardware Accelerated Execution Manager) in 2023 and
QEMU 8.2 removed its support; crosvm still carries a HAXM backend.  pyvmm-haxm
speaks its API v4 on the three hosts HAXM ran on: Windows (``\\\\.\\HAX`` through
``DeviceIoControl``), macOS and Linux (``/dev/HAX`` through ``ioctl``).

Built on the backend kit (:mod:`pyvmm.backend`), as every pyvmm backend is:

- :mod:`pyvmm_haxm.bindings`: cffi declarations, constants, request numbers per host OS
- :mod:`pyvmm_haxm.host`: ``HOST``, the switch between the real driver and a model, and
  the POSIX (``ioctl``) and Windows (``DeviceIoControl``) channels
- :mod:`pyvmm_haxm.system`: the system device, version and capability checks, the probe
- :mod:`pyvmm_haxm.vm`, :mod:`pyvmm_haxm.vcpu`: the VM and vCPU classes, whose methods are
  the backend's hooks; :mod:`pyvmm_haxm.regs` and :mod:`pyvmm_haxm.kick` what they use
- :mod:`pyvmm_haxm.plugin`: the manifest and the plugin object (entry point ``haxm``)
- :mod:`pyvmm_haxm.model`: the HAXM driver model, for running without HAXM

The interface facts the code relies on are in ``docs/backends/haxm.md``.
"""

__version__ = "0.1.0"
