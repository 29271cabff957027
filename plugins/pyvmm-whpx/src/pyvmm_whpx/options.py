"""The whpx backend's ``backend_options``: the partition's extended exits and
its CPUID results, all set before ``WHvSetupPartition``.

``cpuid_exits`` / ``msr_exits`` (bool, default False)
    ``ExtendedVmExits.X64CpuidExit`` / ``X64MsrExit``: CPUID and RDMSR/WRMSR
    become :class:`~pyvmm.exits.CpuidExit` / :class:`~pyvmm.exits.MsrAccessExit`
    for the VMM to answer (``CPUIDAccess.md``, ``MSRAccess.md``: they exit only
    when enabled).  Refused when ``WHvGetCapability(ExtendedVmExits)`` does not
    offer them.
``cpuid_results`` (list of mappings with ``function``, ``eax``, ``ebx``, ``ecx``, ``edx``)
    ``CpuidResultList``: what CPUID of those functions answers, for any subleaf
    (``WHV_X64_CPUID_RESULT`` has none).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyvmm.errors import ConfigError
from pyvmm_whpx import bindings as w

_U32 = 0xFFFF_FFFF
_RESULT_FIELDS = ("function", "eax", "ebx", "ecx", "edx")


@dataclass(frozen=True)
class PartitionOptions:
    """What the options ask of the partition."""

    extended_exits: int = 0
    #: (function, eax, ebx, ecx, edx) per CpuidResultList element.
    cpuid_results: tuple[tuple[int, int, int, int, int], ...] = ()

    def cpuid_result_list(self) -> bytes:
        """The ``WHV_X64_CPUID_RESULT`` array: Function, Reserved[3], Eax, Ebx, Ecx, Edx."""
        return b"".join(struct.pack("<I12xIIII", *result) for result in self.cpuid_results)


def parse(options: Mapping[str, Any], offered_exits: int) -> PartitionOptions:
    """The options, checked against what this Windows offers.

    :raises ConfigError: an unknown option, a value of the wrong type, or an exit
        ``WHvGetCapability(ExtendedVmExits)`` does not offer.
    """
    left = dict(options)
    exits = 0
    for name, bit in (("cpuid_exits", w.EXTENDED_EXIT_CPUID), ("msr_exits", w.EXTENDED_EXIT_MSR)):
        value = left.pop(name, False)
        if not isinstance(value, bool):
            raise ConfigError(f"backend_options.{name}: true or false, not {value!r}")
        if value and not offered_exits & bit:
            raise ConfigError(f"backend_options.{name}: this Windows offers no such exit (ExtendedVmExits)")
        exits |= bit if value else 0
    results = _cpuid_results(left.pop("cpuid_results", []))
    if left:
        raise ConfigError(f"backend_options: unknown whpx option(s) {', '.join(sorted(left))}")
    return PartitionOptions(exits, results)


def _cpuid_results(value: Any) -> tuple[tuple[int, int, int, int, int], ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"backend_options.cpuid_results: a list of results, not {value!r}")
    results = []
    functions: set[int] = set()
    for i, entry in enumerate(value):
        where = f"backend_options.cpuid_results[{i}]"
        if not isinstance(entry, Mapping) or set(entry) != set(_RESULT_FIELDS):
            raise ConfigError(f"{where}: a mapping of exactly {', '.join(_RESULT_FIELDS)}, not {entry!r}")
        fields = [entry[name] for name in _RESULT_FIELDS]
        if not all(isinstance(f, int) and not isinstance(f, bool) and 0 <= f <= _U32 for f in fields):
            raise ConfigError(f"{where}: every field a 32-bit unsigned integer, not {entry!r}")
        if fields[0] in functions:
            raise ConfigError(f"{where}: function {fields[0]:#x} given twice")
        functions.add(fields[0])
        results.append((fields[0], fields[1], fields[2], fields[3], fields[4]))
    return tuple(results)
