"""The OS seam of pyvmm-geniezone: the backend kit's device-file seam with
GenieZone's ioctl names.  Every system call the backend makes goes through the
host :data:`HOST` hands out; tests put the driver model behind it with
``HOST.use(model)`` (see :mod:`pyvmm.backend.host`)."""

from __future__ import annotations

from pyvmm.backend import HostSwitch, LibcDeviceSeam
from pyvmm_geniezone.bindings import IOCTL_NAMES

HOST = HostSwitch("geniezone", LibcDeviceSeam, IOCTL_NAMES)
