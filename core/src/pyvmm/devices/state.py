"""Saving and restoring a device's state, for machine snapshots.

A device that holds state the guest can see declares :attr:`Device.state_version`
(1 or more) and implements :meth:`Device.save_state` / :meth:`Device.load_state`
on a :data:`DeviceState`: a flat mapping of field names to integers, booleans
or bytes, which the snapshot file stores as JSON.  A device with nothing to save
declares version 0; a device that declares nothing (``None``) cannot be
snapshotted, and a snapshot of a machine holding one is refused by name rather
than restored without it.

Loading checks before it changes anything: the version, then every field's
presence, type and range (:func:`take`), so a device is either restored whole or
left as it was, with a :class:`DeviceStateError` naming the device and field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

from pyvmm.errors import PyvmmError
from pyvmm.lean_dataclass import lean_dataclass

#: What one field of a device's state may be.
StateValue = int | bool | bytes
#: A device's state: field name to value.
DeviceState = dict[str, StateValue]

_V = TypeVar("_V", int, bool, bytes)


class Stateful(Protocol):
    """What holds a device's state: a bus device, or the controller behind
    several port views (:meth:`pyvmm.devices.base.Device.state_holder`)."""

    @property
    def name(self) -> str: ...

    @property
    def state_version(self) -> int | None: ...

    def save_state(self) -> DeviceState: ...

    def load_state(self, state: DeviceState) -> None: ...


class DeviceStateError(PyvmmError):
    """A device's saved state does not fit the device: another version, a field
    missing, extra, of the wrong type or out of range.  The device is unchanged."""


def check_fields(device: str, state: Mapping[str, object], names: set[str]) -> None:
    """``state`` has exactly the fields ``names``."""
    if set(state) != names:
        missing, extra = sorted(names - set(state)), sorted(set(state) - names)
        raise DeviceStateError(f"device {device}: saved state fields differ (missing {missing}, unexpected {extra})")


def take(device: str, state: Mapping[str, object], name: str, kind: type[_V], bits: int = 64) -> _V:
    """Field ``name`` of ``state``, checked to be a ``kind`` (an integer of at
    most ``bits`` bits, unsigned)."""
    value = state.get(name)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
            raise DeviceStateError(
                f"device {device}: field {name} must be a {bits}-bit unsigned integer, not {value!r}"
            )
    elif not isinstance(value, kind):
        raise DeviceStateError(f"device {device}: field {name} must be {kind.__name__}, not {type(value).__name__}")
    return value  # type: ignore[return-value]


def check_version(device: str, version: int, expected: int | None) -> None:
    """A saved ``version`` this device reads (the one it writes)."""
    if expected is None:
        raise DeviceStateError(f"device {device}: it does not support snapshots")
    if version != expected:
        raise DeviceStateError(f"device {device}: saved state version {version}, this pyvmm reads version {expected}")


@lean_dataclass(frozen=True)
class DeviceImage:
    """One device's saved state in a machine snapshot: ``key`` says where the
    device sits (its bus and address), so the restore finds the same device."""

    key: str
    version: int
    state: DeviceState
