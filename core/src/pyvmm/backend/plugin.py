"""The generated hook adapter: a backend's VM and vCPU classes become a plugin.

The hook specifications (:mod:`pyvmm.hookspecs`) stay the contract, and pluggy
still registers and checks every implementation.  What a backend no longer
writes is a module of one-line forwarders: :func:`backend_plugin` reads each
specification's metadata (:class:`pyvmm.contract.HookSpecInfo`) and, for every
hook whose method the backend's VM or vCPU class defines, generates the
``@hookimpl`` that forwards to it::

    plugin = backend_plugin(manifest=manifest, create_vm=KvmVm.create, vm_class=KvmVm, vcpu_class=KvmVcpu)
    # pyvmm_map_memory(vm, region)  ->  vm.map_memory(region)
    # pyvmm_run_vcpu(vcpu)          ->  vcpu.run()

The backend's manifest names the plugin object (``plugin="pyvmm_kvm.plugin:plugin"``),
which core imports when the backend is first used (:mod:`pyvmm.plugins`).
Which hooks exist follows from which methods the classes define, so a manifest
that declares a capability without the methods (or the other way round) is
refused at registration exactly as a hand-written plugin would be.

Why generated rather than hand-written: the forwarders carried no decisions,
only names, and every backend repeated them (120-180 lines each); here the one
table of names is the specifications' metadata.  Why not hook implementations as
methods of the handle classes themselves: pluggy calls hooks on the registered
plugin object, not on per-VM handles, so a method on a handle cannot be a
hookimpl without a forwarder of some kind; generating it keeps both the pluggy
contract and the plain classes.  Each forwarder records the method it calls
(:data:`FORWARD_ATTRIBUTE`), which lets core bind the handle's own method for the
per-exit path (``Vcpu.run`` is ``handle.run``: no adapter frame per exit).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pyvmm.config import VmConfig
from pyvmm.contract import HookSpecInfo, specs
from pyvmm.hookspecs import hookimpl
from pyvmm.manifest import BackendManifest

#: Set on every generated forwarder: ``(target, method)``, e.g. ``("vcpu", "run")``.
FORWARD_ATTRIBUTE = "__pyvmm_forward__"


def _forwarder(info: HookSpecInfo, spec: Callable[..., Any]) -> Callable[..., Any]:
    method = info.method

    def forward(handle: Any, *args: Any) -> Any:
        return getattr(handle, method)(*args)

    # pluggy reads an implementation's argument names through ``__wrapped__``:
    # pointing it at the specification gives the forwarder the spec's names.
    functools.update_wrapper(forward, spec)
    setattr(forward, FORWARD_ATTRIBUTE, (info.on, method))
    return hookimpl(forward)


class GeneratedPlugin:
    """A plugin object whose ``pyvmm_*`` attributes are generated hook implementations."""

    def __init__(self, name: str, hooks: dict[str, Callable[..., Any]]) -> None:
        self.__name__ = name
        for hook, fn in hooks.items():
            setattr(self, hook, fn)

    def __repr__(self) -> str:
        return f"<pyvmm backend plugin {self.__name__}>"


def backend_plugin(
    *,
    manifest: Callable[[], BackendManifest],
    create_vm: Callable[[Any, VmConfig], Any],
    vm_class: type,
    vcpu_class: type,
    name: str | None = None,
) -> GeneratedPlugin:
    """The plugin object for a backend built on the template.

    :param manifest: returns the backend's manifest (``pyvmm_backend_info``).
    :param create_vm: ``(backend, config) -> VM handle`` (``pyvmm_create_vm``).
    :param vm_class: the VM handle's class; its methods implement the ``vm`` hooks.
    :param vcpu_class: the vCPU handle's class; its methods implement the ``vcpu`` hooks.
    """
    import pyvmm.hookspecs as spec_module

    hooks: dict[str, Callable[..., Any]] = {
        "pyvmm_backend_info": hookimpl(_named(manifest, spec_module.pyvmm_backend_info)),
        "pyvmm_create_vm": hookimpl(_named(create_vm, spec_module.pyvmm_create_vm)),
    }
    owners = {"vm": vm_class, "vcpu": vcpu_class}
    for hook, info in specs().items():
        if info.on == "backend":
            continue
        if callable(getattr(owners[info.on], info.method, None)):
            hooks[hook] = _forwarder(info, getattr(spec_module, hook))
    return GeneratedPlugin(name or vm_class.__module__.split(".")[0], hooks)


def _named(fn: Callable[..., Any], spec: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` under the specification's name and argument names."""

    def call(*args: Any) -> Any:
        return fn(*args)

    functools.update_wrapper(call, spec)
    return call
