"""The OS seam of pyvmm-kvm: the backend kit's device-file seam with KVM's
ioctl names.  Every system call the backend makes goes through the host
:data:`HOST` hands out; tests put a recording or failing seam behind it with
``HOST.use(seam)`` (see :mod:`pyvmm.backend.host`)."""

from __future__ import annotations

from pyvmm.backend import HostSwitch, LibcDeviceSeam
from pyvmm_kvm.bindings import IOCTL_NAMES

HOST = HostSwitch("kvm", LibcDeviceSeam, IOCTL_NAMES)
