"""The OS seam of pyvmm-gunyah: the backend kit's device-file seam with Gunyah's
ioctl names.  Every system call the backend makes goes through the host
:data:`HOST` hands out; tests put the Gunyah driver model (or a recording or
failing seam) behind it with ``HOST.use(seam)`` (see :mod:`pyvmm.backend.host`)."""

from __future__ import annotations

from pyvmm.backend import HostSwitch, LibcDeviceSeam
from pyvmm_gunyah.bindings import IOCTL_NAMES

HOST = HostSwitch("gunyah", LibcDeviceSeam, IOCTL_NAMES)
