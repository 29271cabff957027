"""Finishing port and MMIO exits through WinHvEmulation.dll.

WHPX exits *before* an I/O instruction: the VMM emulates it.  The emulator API
(``WHvEmulatorTryIoEmulation`` / ``WHvEmulatorTryMmioEmulation``) decodes the
instruction and calls back into the VMM for every register it reads or writes,
every guest-virtual page it translates, and every port or memory access it
makes (Microsoft, ``WinHvEmulation.h``; crosvm ``whpx/vcpu.rs`` and QEMU
``whpx-all.c`` use it the same way).  Those callbacks want the device's answer
*synchronously*, while pyvmm's exit contract hands an access to the VMM and
takes the answer on the next run.  :class:`Emulation` reconciles the two with
at most two passes of the emulator over one exit:

* an instruction that only **writes** (``OUT``, ``OUTS``, a store to MMIO) is
  emulated once, at the exit, in :attr:`Pass.COMPLETE`: the device writes are
  collected for the exit and the registers are committed;
* one that **reads** is first emulated in :attr:`Pass.PROBE` at the exit --
  device reads answer zero, guest-RAM writes and register writes are dropped --
  which tells the size and count of its accesses for the exit; the next run
  emulates it again in :attr:`Pass.COMPLETE`, the device reads answered from
  the exit's ``data``.

Both passes see the same guest state (nothing ran in between), so they make
the same accesses; a complete pass that asks for more device data than the
probe reported is refused as an emulation failure.
"""

from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvmm.backend import DllHost
from pyvmm_whpx import bindings as w
from pyvmm_whpx.bindings import address, ffi

if TYPE_CHECKING:
    from pyvmm_whpx.vm import WhpxVm

#: An HRESULT a callback returns to make the emulator give up (E_FAIL).
E_FAIL = -0x7FFF_BFFB


class Pass(enum.Enum):
    PROBE = "probe"
    COMPLETE = "complete"


@dataclass
class Accesses:
    """The device accesses of one emulated instruction, in order."""

    #: (is_write, address or port, size, value) per device access.
    items: list[tuple[bool, int, int, int]] = field(default_factory=list)
    #: Answers for the device reads of a complete pass, in order.
    answers: list[int] = field(default_factory=list)
    failure: str = ""
    #: The RIP the emulator set (past the instruction), in either pass; None until it sets one.
    next_rip: int | None = None


class Emulation:
    """One vCPU's emulator handle and the callbacks it calls."""

    def __init__(self, host: DllHost, vm: WhpxVm, index: int) -> None:
        self.host = host
        self.vm = vm
        self.index = index
        self.mode = Pass.COMPLETE
        self.accesses = Accesses()
        # The callbacks must outlive the emulator: keep them on the object.
        self._callbacks = (
            ffi.callback("WHV_EMULATOR_IO_PORT_CALLBACK", self._io_port, error=E_FAIL),
            ffi.callback("WHV_EMULATOR_MEMORY_CALLBACK", self._memory, error=E_FAIL),
            ffi.callback("WHV_EMULATOR_GET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK", self._get_registers, error=E_FAIL),
            ffi.callback("WHV_EMULATOR_SET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK", self._set_registers, error=E_FAIL),
            ffi.callback("WHV_EMULATOR_TRANSLATE_GVA_PAGE_CALLBACK", self._translate, error=E_FAIL),
        )
        table = ffi.new("WHV_EMULATOR_CALLBACKS *")
        table.Size = ffi.sizeof("WHV_EMULATOR_CALLBACKS")
        (
            table.WHvEmulatorIoPortCallback,
            table.WHvEmulatorMemoryCallback,
            table.WHvEmulatorGetVirtualProcessorRegisters,
            table.WHvEmulatorSetVirtualProcessorRegisters,
            table.WHvEmulatorTranslateGvaPage,
        ) = self._callbacks
        self._table = table
        slot = ffi.new("void **")
        host.call_hresult("WHvEmulatorCreateEmulator", address(table), address(slot))
        self.handle = int(ffi.cast("uintptr_t", slot[0]))
        self._status = ffi.new("uint32_t *")

    def close(self) -> None:
        if self.handle:
            handle, self.handle = self.handle, 0
            self.host.call_hresult("WHvEmulatorDestroyEmulator", handle)

    # --- one pass ---------------------------------------------------------------------
    def run(self, mode: Pass, function: str, vp_context: Any, access_context: Any, answers: list[int]) -> Accesses:
        """Emulate the instruction of the exit once in ``mode``; the device
        accesses it made.  ``failure`` is set when the emulator gave up."""
        self.mode = mode
        self.accesses = Accesses(answers=list(answers))
        self._status[0] = 0
        self.host.call_hresult(
            function, self.handle, 0, address(vp_context), address(access_context), address(self._status)
        )
        status = int(self._status[0])
        if not status & w.EMULATOR_SUCCESSFUL and not self.accesses.failure:
            self.accesses.failure = f"{function} could not emulate the instruction (WHV_EMULATOR_STATUS {status:#x})"
        return self.accesses

    # --- callbacks (called by the emulator, on this thread) ---------------------------
    def _device_read(self) -> int | None:
        if self.mode is Pass.PROBE:
            return 0
        if not self.accesses.answers:
            self.accesses.failure = "the emulator read more from the device than the exit reported"
            return None
        return self.accesses.answers.pop(0)

    def _io_port(self, _context: Any, info: Any) -> int:
        size = int(info.AccessSize)
        if info.Direction:
            self.accesses.items.append((True, int(info.Port), size, int(info.Data) & ((1 << (8 * size)) - 1)))
            return 0
        value = self._device_read()
        if value is None:
            return E_FAIL
        self.accesses.items.append((False, int(info.Port), size, value))
        info.Data = value
        return 0

    def _memory(self, _context: Any, info: Any) -> int:
        gpa = int(info.GpaAddress)
        size = int(info.AccessSize)
        is_write = bool(info.Direction)
        region = self.vm.region_at(gpa)
        if region is not None and gpa + size <= region.end and not (is_write and region.read_only):
            # Guest RAM the emulator touches for a string instruction.
            host = region.host_addr + gpa - region.guest_phys_addr
            if not is_write:
                ctypes.memmove(address(info.Data), host, size)
            elif self.mode is Pass.COMPLETE:
                ctypes.memmove(host, address(info.Data), size)
            return 0
        if is_write:
            value = int.from_bytes(bytes(ffi.buffer(info.Data, size)), "little")
            self.accesses.items.append((True, gpa, size, value))
            return 0
        answer = self._device_read()
        if answer is None:
            return E_FAIL
        self.accesses.items.append((False, gpa, size, answer))
        ffi.memmove(info.Data, answer.to_bytes(8, "little"), size)
        return 0

    def _get_registers(self, _context: Any, names: Any, count: int, values: Any) -> int:
        return self._registers("WHvGetVirtualProcessorRegisters", names, count, values)

    def _set_registers(self, _context: Any, names: Any, count: int, values: Any) -> int:
        # The new RIP tells the instruction's length, which the exit context's
        # InstructionBytes do not: the hypervisor may hand fewer or more bytes.
        for i in range(count):
            if int(names[i]) == w.RIP:
                self.accesses.next_rip = int(values[i].Low64)
        if self.mode is Pass.PROBE:
            return 0  # the probe pass changes nothing
        return self._registers("WHvSetVirtualProcessorRegisters", names, count, values)

    def _registers(self, function: str, names: Any, count: int, values: Any) -> int:
        result: int = self.host.seam.function(function)(
            self.vm.handle, self.index, address(names), count, address(values)
        )
        return int(result)

    def _translate(self, _context: Any, gva: int, flags: int, result_code: Any, gpa: Any) -> int:
        result = ffi.new("WHV_TRANSLATE_GVA_RESULT *")
        hresult: int = self.host.seam.function("WHvTranslateGva")(
            self.vm.handle, self.index, gva, flags, address(result), address(gpa)
        )
        result_code[0] = result.ResultCode
        return int(hresult)
