"""Every pyvmm error survives pickling with all its fields (issue 9, point 6).

The parametrized test walks the whole ``pyvmm`` package, so an error class added
anywhere in core is covered without touching this file; one that needs
constructor arguments this file cannot guess fails with a message saying so.
"""

from __future__ import annotations

import copy
import enum
import errno
import importlib
import inspect
import pickle
import pkgutil
from pathlib import Path
from typing import Any

import pytest

import pyvmm
from pyvmm.capabilities import Capability
from pyvmm.errors import (
    BackendUnavailable,
    ErrorSpace,
    HypervisorError,
    PyvmmError,
    UnknownExitError,
    UnsupportedCapability,
)

#: Modules that need an optional dependency may be absent; everything else must import.
OPTIONAL_DEPENDENCIES = {"unicorn"}


def _pyvmm_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(pyvmm.__path__, "pyvmm."):
        if info.name == "pyvmm.__main__":
            continue  # a script: importing it runs the CLI
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in OPTIONAL_DEPENDENCIES:
                raise
            continue
        names.append(info.name)
    return names


def _error_classes() -> list[type[PyvmmError]]:
    modules = set(_pyvmm_modules())
    found: dict[str, type[PyvmmError]] = {}
    pending: list[type[PyvmmError]] = [PyvmmError]
    while pending:
        cls = pending.pop()
        if cls.__module__ in modules or cls.__module__ == "pyvmm.errors":
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        pending.extend(cls.__subclasses__())
    return [found[name] for name in sorted(found)]


ERROR_CLASSES = _error_classes()

#: Constructor arguments for classes whose signature alone does not say enough.
#: Every value is distinct from the defaults, so a field that falls back to a
#: default after unpickling shows up as a difference.
SAMPLES: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "pyvmm.errors.HypervisorError": (("WHvCreatePartition", 0x80070057, "a detail"), {"space": ErrorSpace.HRESULT}),
    "pyvmm.errors.UnknownExitError": (("KVM_RUN", 9999), {}),
    "pyvmm.errors.UnsupportedCapability": (
        ("kvm", Capability.DIRTY_LOG, "a dirty-logged region"),
        {"because": "a reason"},
    ),
    "pyvmm.errors.MsrAccessError": (("KVM_SET_MSRS", 0xDEAD0000, 1, ((0x10, 5),)), {"write": True}),
    "pyvmm.records.RecordError": (("VmConfig", [("vcpus", "0 is out of range"), ("arch", "must be x86_64")]), {}),
    "pyvmm.machine.config.MachineConfigError": (
        ("MachineConfig", [("cpus", "must be an integer")], (("initrd", "kernel", "the demo guest takes none"),)),
        {},
    ),
}


def _sample(parameter: inspect.Parameter, index: int) -> Any:
    """A value for a constructor parameter, from its annotation (a string: the
    modules use ``from __future__ import annotations``)."""
    annotation = str(parameter.annotation)
    if "int" in annotation and "str" not in annotation:
        return 7000 + index
    if "Path" in annotation or "str" in annotation or parameter.annotation is inspect.Parameter.empty:
        return f"{parameter.name}-{index}"
    if annotation == "object":
        return Capability.IRQFD
    raise LookupError(annotation)


def _constructor_arguments(cls: type[PyvmmError]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key in SAMPLES:
        return SAMPLES[key]
    init = inspect.unwrap(cls.__init__)
    if init in (Exception.__init__, ValueError.__init__, RuntimeError.__init__, ImportError.__init__):
        return ((f"a {cls.__name__} message",), {})
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for index, parameter in enumerate(list(inspect.signature(init).parameters.values())[1:]):
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        try:
            value = _sample(parameter, index)
        except LookupError:
            pytest.fail(f"add constructor arguments for {key} to SAMPLES in {Path(__file__).name}")
        if parameter.kind is parameter.KEYWORD_ONLY:
            kwargs[parameter.name] = value
        else:
            args.append(value)
    return tuple(args), kwargs


def _fields(error: BaseException) -> dict[str, Any]:
    """Everything that describes an error: its attributes, args, message, and the
    OSError fields (which live in C slots, not in ``__dict__``)."""
    fields = dict(vars(error))
    fields["args"] = error.args
    fields["str"] = str(error)
    fields["type"] = type(error)
    if isinstance(error, OSError):
        fields.update(errno=error.errno, strerror=error.strerror, filename=error.filename)
    if isinstance(error, ImportError):
        fields.update(name=error.name, path=error.path, msg=error.msg)
    return fields


def test_the_walk_finds_errors_in_several_modules() -> None:
    """The walk must reach beyond pyvmm.errors (or the parametrized test proves little)."""
    modules = {cls.__module__ for cls in ERROR_CLASSES}
    assert "pyvmm.errors" in modules
    assert len(modules) >= 3, modules
    assert UnknownExitError in ERROR_CLASSES


def _class_id(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=_class_id)
@pytest.mark.parametrize("protocol", [0, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_every_pyvmm_error_round_trips_through_pickle(cls: type[PyvmmError], protocol: int) -> None:
    args, kwargs = _constructor_arguments(cls)
    error = cls(*args, **kwargs)
    restored = pickle.loads(pickle.dumps(error, protocol))
    assert _fields(restored) == _fields(error)
    assert str(restored) == str(error)
    assert _fields(copy.copy(error)) == _fields(error)
    assert _fields(copy.deepcopy(error)) == _fields(error)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=_class_id)
def test_attributes_set_after_construction_survive_too(cls: type[PyvmmError]) -> None:
    # A subclass's own __reduce__ would drop notes and attributes set after
    # construction: PyvmmError pickles every subclass from its constructor arguments.
    assert cls is PyvmmError or "__reduce__" not in vars(cls), f"{_class_id(cls)} defines its own __reduce__"
    args, kwargs = _constructor_arguments(cls)
    error = cls(*args, **kwargs)
    error.__notes__ = ["a note added after construction"]  # type: ignore[attr-defined]  # add_note() is 3.11+
    error.extra = "set after construction"  # type: ignore[attr-defined]
    restored = pickle.loads(pickle.dumps(error))
    assert restored.__notes__ == ["a note added after construction"]
    assert _fields(restored) == _fields(error)


def test_unknown_exit_keeps_its_reason() -> None:
    """The reproduction from the issue: the reason came back as 71 (EPROTO)."""
    restored = pickle.loads(pickle.dumps(UnknownExitError("KVM_RUN", 9999)))
    assert restored.reason == 9999
    assert restored.errno == errno.EPROTO
    assert restored.detail == "unknown exit reason 9999"


def test_fields_of_the_errors_with_arguments_survive() -> None:
    unavailable = pickle.loads(pickle.dumps(BackendUnavailable("whpx", "no hypervisor here")))
    assert (unavailable.backend, unavailable.reason) == ("whpx", "no hypervisor here")
    unsupported = pickle.loads(pickle.dumps(UnsupportedCapability("kvm", Capability.IRQFD, "an irqfd")))
    assert unsupported.capability is Capability.IRQFD
    assert (unsupported.backend, unsupported.what, unsupported.because) == ("kvm", "an irqfd", "")
    original = HypervisorError("WHvRunVirtualProcessor", -2143878392, space="HRESULT")  # type: ignore[arg-type]
    hresult = pickle.loads(pickle.dumps(original))
    assert hresult.space is ErrorSpace.HRESULT
    assert (hresult.code, hresult.code_name) == (0x8037_0308, "WHV_E_INVALID_VP_STATE")


class _Abi(enum.Enum):
    A = "a"
    B = "b"


class _PluginError(HypervisorError):
    """Shaped like pyvmm-gunyah's UnsupportedAbi: its own constructor, whose
    arguments differ from HypervisorError's, and no ``__reduce__``."""

    def __init__(self, path: str, abi: _Abi) -> None:
        super().__init__("interface probe", errno.ENOTTY, f"{path} speaks ABI {abi.value}")
        self.abi = abi


class _Mixin:
    def __init__(self, what: str, count: int) -> None:
        Exception.__init__(self, f"{what} x{count}")  # type: ignore[arg-type]
        self.what = what
        self.count = count


class _MixinFirst(_Mixin, PyvmmError):
    """The constructor comes from a mixin earlier in the MRO than PyvmmError."""


@pytest.mark.parametrize(
    "error",
    [_PluginError("/dev/gunyah", _Abi.A), _MixinFirst("regions", 3)],
    ids=["plugin-subclass", "mixin-constructor"],
)
def test_subclasses_outside_pyvmm_pickle_without_a_reduce_of_their_own(error: PyvmmError) -> None:
    restored = pickle.loads(pickle.dumps(error))
    assert _fields(restored) == _fields(error)


def test_gunyah_unsupported_abi_round_trips() -> None:
    system = pytest.importorskip("pyvmm_gunyah.system")
    error = system.UnsupportedAbi("/dev/gunyah", system.Abi.A)
    restored = pickle.loads(pickle.dumps(error))
    assert restored.abi is system.Abi.A
    assert _fields(restored) == _fields(error)


def test_nested_constructors_record_the_outermost_arguments() -> None:
    error = _PluginError("/dev/gunyah", _Abi.B)
    assert vars(error)["_pyvmm_ctor"] == (("/dev/gunyah", _Abi.B), {})
    assert "_pyvmm_recording" not in vars(error)  # cleared once the constructor returns
