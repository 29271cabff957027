"""Exit objects: slotted, distinct kinds, a readable repr for each."""

from __future__ import annotations

import inspect

import pytest

from pyvmm import exits
from pyvmm.exits import ExitKind, VcpuExit

EXIT_CLASSES = [
    cls for _, cls in inspect.getmembers(exits, inspect.isclass) if issubclass(cls, VcpuExit) and cls is not VcpuExit
]


def test_every_kind_has_exactly_one_class() -> None:
    kinds = [cls.kind for cls in EXIT_CLASSES]
    assert all(isinstance(kind, ExitKind) for kind in kinds)
    assert len(set(kinds)) == len(kinds)
    assert set(kinds) == set(ExitKind)


@pytest.mark.parametrize("cls", EXIT_CLASSES, ids=[c.__name__ for c in EXIT_CLASSES])
def test_repr_and_slots(cls: type[VcpuExit]) -> None:
    exit_ = cls()
    text = repr(exit_)
    assert text.startswith(f"{cls.__name__}(")
    assert text.endswith(")")
    slot_names: tuple[str, ...] = tuple(cls.__slots__)
    for name in slot_names:
        assert f"{name}=" in text
    assert not hasattr(exit_, "__dict__")  # slotted all the way down
    with pytest.raises(AttributeError):
        exit_.not_a_field = 1  # type: ignore[attr-defined]
    assert exit_.kind is cls.kind


def test_repr_shows_values_readably() -> None:
    io = exits.IoExit()
    io.port, io.size, io.count, io.is_write = 0x3F8, 1, 1, True
    io.data[:1] = b"A"
    assert repr(io) == "IoExit(count=0x1, data=4100000000000000, instruction=b'', is_write=True, port=0x3f8, size=0x1)"
    shutdown = exits.ShutdownExit()
    assert repr(shutdown) == "ShutdownExit(raw_error_code=0x0, reason=<ShutdownReason.TRIPLE_FAULT: 1>)"
    internal = exits.InternalErrorExit(suberror=1, instruction=b"\x0f\x01\xca", description="clac")
    assert "instruction=b'\\x0f\\x01\\xca'" in repr(internal)
    assert "description='clac'" in repr(internal)


def test_completion_buffers_are_writable_views() -> None:
    for exit_ in (exits.IoExit(), exits.MmioExit()):
        assert isinstance(exit_.data, memoryview)
        assert not exit_.data.readonly
        exit_.data[:4] = b"\x01\x02\x03\x04"
        assert exit_.data.tobytes()[:4] == b"\x01\x02\x03\x04"
