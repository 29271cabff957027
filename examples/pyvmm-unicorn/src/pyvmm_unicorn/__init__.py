"""Example pyvmm backend: guests run on pyvmm's software CPU (unicorn).

- :mod:`pyvmm_unicorn.machine`: the backend's VM and vCPU handles
- :mod:`pyvmm_unicorn.plugin`: the manifest and the plugin object (entry point ``unicorn``)
"""

__version__ = "0.1.0"
