"""``lean_dataclass`` behaves as ``dataclasses.dataclass`` does for what pyvmm's
records use: construction, defaults, ``__post_init__``, equality, hashing,
``repr``, frozenness, ``replace``/``fields``/``asdict``, copying and pickling.
Each behaviour is checked side by side with a real dataclass of the same shape."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import field

import pytest

from pyvmm.lean_dataclass import lean_dataclass


@lean_dataclass(frozen=True, slots=True, kw_only=True)
class FrozenSlotted:
    name: str
    size: int = 4
    tags: list[str] = field(default_factory=list)
    note: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name.strip())


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FrozenSlottedReference:
    name: str
    size: int = 4
    tags: list[str] = field(default_factory=list)
    note: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name.strip())


@lean_dataclass(frozen=True)
class FrozenPlain:
    address: int
    length: int = 1


@dataclasses.dataclass(frozen=True)
class FrozenPlainReference:
    address: int
    length: int = 1


@lean_dataclass(slots=True)
class Mutable:
    rax: int = 0
    rbx: int = 0


@dataclasses.dataclass(slots=True)
class MutableReference:
    rax: int = 0
    rbx: int = 0


@lean_dataclass
class Bare:
    items: list[int] = field(default_factory=list)


def pairs() -> list[tuple[object, object]]:
    return [
        (FrozenSlotted(name=" a ", tags=["x"]), FrozenSlottedReference(name=" a ", tags=["x"])),
        (FrozenPlain(0x1000), FrozenPlainReference(0x1000)),
        (Mutable(1, 2), MutableReference(1, 2)),
    ]


@pytest.mark.parametrize(("lean", "reference"), pairs())
def test_repr_reads_as_the_dataclass_one(lean: object, reference: object) -> None:
    shown = repr(reference).replace("Reference", "", 1)
    assert repr(lean) == shown


@pytest.mark.parametrize(("lean", "reference"), pairs())
def test_fields_and_asdict_match_the_dataclass(lean: object, reference: object) -> None:
    assert [f.name for f in dataclasses.fields(lean)] == [f.name for f in dataclasses.fields(reference)]  # type: ignore[arg-type]
    assert dataclasses.asdict(lean) == dataclasses.asdict(reference)  # type: ignore[call-overload]


def test_post_init_and_defaults_run() -> None:
    record = FrozenSlotted(name="  kvm ")
    assert record.name == "kvm"
    assert record.size == 4
    assert record.tags == []
    assert FrozenSlotted(name="a").tags is not FrozenSlotted(name="a").tags


def test_keyword_only_is_kept() -> None:
    with pytest.raises(TypeError):
        FrozenSlotted("a")  # type: ignore[misc]


def test_equality_compares_the_compared_fields_of_the_same_class_only() -> None:
    assert FrozenSlotted(name="a", note="one") == FrozenSlotted(name="a", note="two")
    assert FrozenSlotted(name="a") != FrozenSlotted(name="b")
    assert FrozenPlain(1) != FrozenPlainReference(1)
    assert FrozenPlain(1) != (1, 1)
    assert Mutable(1, 2) == Mutable(1, 2)
    assert Mutable(1, 2) != Mutable(2, 1)


def test_frozen_records_hash_as_dataclasses_do() -> None:
    assert hash(FrozenPlain(5, 2)) == hash(FrozenPlainReference(5, 2))
    with pytest.raises(TypeError):  # a list field is unhashable for both
        hash(FrozenSlottedReference(name="a"))
    with pytest.raises(TypeError):
        hash(FrozenSlotted(name="a"))
    assert len({FrozenPlain(1), FrozenPlain(1), FrozenPlain(2)}) == 2


def test_mutable_records_are_unhashable_as_dataclasses_are() -> None:
    with pytest.raises(TypeError):
        hash(Mutable())
    with pytest.raises(TypeError):
        hash(MutableReference())


@pytest.mark.parametrize("record", [FrozenSlotted(name="a"), FrozenPlain(1)])
def test_frozen_records_refuse_assignment_and_deletion(record: object) -> None:
    first = dataclasses.fields(record)[0].name  # type: ignore[arg-type]
    before = getattr(record, first)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, first, "changed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(record, first)
    assert getattr(record, first) == before


def test_a_frozen_record_refuses_a_field_that_only_had_a_class_default() -> None:
    record = FrozenPlain(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.length = 9  # type: ignore[misc]
    assert record.length == 1


def test_mutable_records_take_assignment() -> None:
    record = Mutable()
    record.rax = 7
    assert record == Mutable(7, 0)
    bare = Bare()
    bare.items = [1]
    assert bare.items == [1]


def test_slots_are_kept() -> None:
    with pytest.raises(AttributeError):
        Mutable().other = 1  # type: ignore[attr-defined]
    assert not hasattr(FrozenSlotted(name="a"), "__dict__")


@pytest.mark.parametrize("record", [FrozenSlotted(name="a", tags=["t"]), FrozenPlain(3, 4), Mutable(1, 2)])
def test_replace_copy_and_pickle_make_equal_records(record: object) -> None:
    assert dataclasses.replace(record) == record  # type: ignore[type-var]
    assert copy.copy(record) == record
    assert copy.deepcopy(record) == record
    assert pickle.loads(pickle.dumps(record)) == record


def test_replace_with_a_change_runs_post_init_and_stays_frozen() -> None:
    changed = dataclasses.replace(FrozenSlotted(name="a"), name=" b ")
    assert changed.name == "b"
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.size = 1  # type: ignore[misc]


def test_a_class_with_its_own_eq_is_refused() -> None:
    with pytest.raises(TypeError, match="defines __eq__"):

        @lean_dataclass
        class OwnEq:
            value: int

            def __eq__(self, other: object) -> bool:
                return True

            __hash__ = object.__hash__
