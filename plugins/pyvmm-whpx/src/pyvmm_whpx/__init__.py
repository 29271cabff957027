"""pyvmm-whpx: the Windows Hypervisor Platform backend for pyvmm.

WinHvPlatform.dll and WinHvEmulation.dll through the backend kit's DLL seam
(:mod:`pyvmm_whpx.host`); :mod:`pyvmm_whpx.model` is a driver model of both DLLs
that runs guests on pyvmm's software CPU, for hosts without WHPX.
"""

__version__ = "0.1.0"
