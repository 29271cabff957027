"""What each hook of the contract is, as data: the single source of the
capability-to-hook map, the required hooks, the method a backend class
implements each hook with, and the documentation tables.

Every specification in :mod:`pyvmm.hookspecs` carries a :class:`HookSpecInfo`
(attached by :func:`hook_info`); everything else is derived from those records:

* :func:`required_hooks`, :func:`hooks_by_capability`, :func:`capability_by_hook`
  (registration checks and core's capability gate);
* :attr:`HookSpecInfo.method` (the generated adapter of
  :mod:`pyvmm.backend.plugin` forwards ``pyvmm_map_memory(vm, region)`` to
  ``vm.map_memory(region)``);
* :func:`hooks_markdown` (the hook table of ``docs/writing-a-backend.md``).

**Contract versions.**  A plugin declares the version it was written for; core
accepts any version from :data:`MIN_CONTRACT_VERSION` to
:data:`CONTRACT_VERSION`.  Additive changes keep older plugins working: a hook
added in version *n* (``since=n``) is simply absent from older plugins, and a
trailing argument added in version *n* (``args_since``) is not passed to an
implementation that does not take it.  Version 2 made one change that is not
additive: the ioevent and irqfd hooks take a :class:`pyvmm.host.Event`
(``event``) where version 1 took an eventfd number (``fd``).  A version-1 plugin
that does not implement those hooks still registers; one that does is refused
with a message naming the change (pluggy itself rejects an implementation
argument the specification lacks, so no adapter can keep it).

This module imports nothing heavy: ``import pyvmm`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any, Literal, TypeVar

from pyvmm.capabilities import Capability
from pyvmm.lean_dataclass import lean_dataclass

#: The version of the hook contract this pyvmm implements.
CONTRACT_VERSION = 3
#: The oldest contract version a plugin may still declare.
MIN_CONTRACT_VERSION = 1
#: Hooks whose arguments changed incompatibly, and how (for registration errors).
CHANGED_HOOKS: dict[str, str] = {
    hook: "contract version 2 passes a pyvmm.host.Event as 'event' where version 1 passed an eventfd number as 'fd'"
    for hook in ("pyvmm_register_ioevent", "pyvmm_unregister_ioevent", "pyvmm_register_irqfd")
}

Target = Literal["backend", "vm", "vcpu"]


@lean_dataclass(frozen=True)
class HookSpecInfo:
    """The contract metadata of one hook specification."""

    #: ``pyvmm_...``: the hook's name.
    name: str
    #: Whose method implements it in the backend template: the backend module
    #: (``backend``), the VM handle (``vm``) or the vCPU handle (``vcpu``).
    on: Target
    #: The method name on that handle (``run`` for ``pyvmm_run_vcpu``).
    method: str
    #: The capability that gates it; None for the required hooks.
    capability: Capability | None = None
    #: Required of every backend.  ``pyvmm_init_vcpu`` is neither: it is required
    #: unless the backend declares HYPERVISOR_INITIALIZED_BOOT_CONTEXT, and
    #: forbidden when it does (:data:`INIT_VCPU_HOOK`).
    required: bool = False
    #: The contract version that added the hook.
    since: int = 1
    #: Trailing arguments added after the hook: name -> contract version.
    args_since: dict[str, int] = field(default_factory=dict)
    #: The argument names, from the specification's signature.
    argnames: tuple[str, ...] = ()
    #: One line for the documentation table.
    summary: str = ""

    def argnames_for(self, version: int) -> tuple[str, ...]:
        """The arguments a plugin of contract ``version`` implements."""
        return tuple(a for a in self.argnames if self.args_since.get(a, 1) <= version)


_SPECS: dict[str, HookSpecInfo] = {}
F = TypeVar("F", bound=Callable[..., Any])

#: The hook that is required unless the hypervisor owns the boot context.
INIT_VCPU_HOOK = "pyvmm_init_vcpu"


def hook_info(
    *,
    on: Target,
    method: str | None = None,
    capability: Capability | None = None,
    required: bool = False,
    since: int = 1,
    args_since: dict[str, int] | None = None,
) -> Callable[[F], F]:
    """Attach :class:`HookSpecInfo` to a hook specification (used in
    :mod:`pyvmm.hookspecs` only)."""

    def record(spec: F) -> F:
        # Imported here: inspect costs more than the rest of this module, and only
        # defining the specifications (pyvmm.hookspecs) needs it.
        import inspect

        name = spec.__name__
        doc = inspect.getdoc(spec) or ""
        info = HookSpecInfo(
            name=name,
            on=on,
            method=method or name.removeprefix("pyvmm_"),
            capability=capability,
            required=required,
            since=since,
            args_since=dict(args_since or {}),
            argnames=tuple(inspect.signature(spec).parameters),
            summary=doc.split("\n\n", 1)[0].replace("\n", " "),
        )
        if (capability is None) == (not required) and name != INIT_VCPU_HOOK:
            raise TypeError(f"{name}: a hook is either required or gated by one capability")
        _SPECS[name] = info
        spec.pyvmm_contract = info  # type: ignore[attr-defined]
        return spec

    return record


def specs() -> dict[str, HookSpecInfo]:
    """Every hook specification's metadata, in definition order."""
    import pyvmm.hookspecs  # noqa: F401 - defining the specifications records them

    return dict(_SPECS)


def required_hooks() -> tuple[str, ...]:
    return tuple(name for name, info in specs().items() if info.required)


def hooks_by_capability() -> dict[Capability, tuple[str, ...]]:
    """Each capability that gates hooks, and its hooks."""
    table: dict[Capability, list[str]] = {}
    for name, info in specs().items():
        if info.capability is not None:
            table.setdefault(info.capability, []).append(name)
    return {cap: tuple(hooks) for cap, hooks in table.items()}


def capability_by_hook() -> dict[str, Capability]:
    return {name: info.capability for name, info in specs().items() if info.capability is not None}


def hooks_markdown() -> str:
    """The hook table of the backend guide, generated from the specifications."""
    rows = ["| hook | implemented as | required / capability | since |", "|---|---|---|---|"]
    for name, info in specs().items():
        if info.required:
            need = "required"
        elif name == INIT_VCPU_HOOK:
            need = "required unless `HYPERVISOR_INITIALIZED_BOOT_CONTEXT`"
        else:
            assert info.capability is not None
            need = f"`{info.capability.name}`"
        args = ", ".join(a for a in info.argnames if a not in ("vm", "vcpu"))
        if info.on == "backend":
            how = f"`backend_plugin({info.method}=...)`"
        else:
            how = f"{info.on.replace('vcpu', 'vCPU').replace('vm', 'VM')} class: `{info.method}({args})`"
        rows.append(f"| `{name}` | {how} | {need} | {info.since} |")
    return "\n".join(rows) + "\n"
