"""Emulated devices of the pyvmm x86 machine, one module each.

Every device implements :class:`pyvmm.devices.base.Device`: ``read`` and
``write`` of an access at an offset from where the device is registered on a
bus.  Devices know nothing about buses, vCPUs or backends; what they need from
the machine (stop the run, raise an interrupt line) they get as callables.
"""
