"""The unicorn backend's plugin object, which :mod:`pyvmm_unicorn.manifest` (the
entry point ``unicorn``) names: core imports it when the backend is first used.
"""

from __future__ import annotations

from pyvmm.backend import backend_plugin
from pyvmm_unicorn.machine import UnicornVcpu, UnicornVm
from pyvmm_unicorn.manifest import CAPABILITIES, manifest

__all__ = ["CAPABILITIES", "manifest", "plugin"]

plugin = backend_plugin(manifest=manifest, create_vm=UnicornVm.create, vm_class=UnicornVm, vcpu_class=UnicornVcpu)
