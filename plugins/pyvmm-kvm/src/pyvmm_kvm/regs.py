"""Conversions between KVM's register structs and pyvmm's register records."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.arch.x86_64 import GPR_NAMES, CpuidEntry, DescriptorTable, Regs, Segment, Sregs
from pyvmm.errors import ConfigError
from pyvmm.interrupts import IrqChip, IrqRoute, MsiRoute
from pyvmm_kvm import bindings as k
from pyvmm_kvm.bindings import ffi

if TYPE_CHECKING:
    # Imported by the conversions that build them: running a guest needs none
    # of these records (a start-up cost).
    from pyvmm.arch.x86_64_extra_state import DebugRegs, Fpu, VcpuEvents

_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEGMENT_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


def regs_from_kvm(raw: Any) -> Regs:
    return Regs(**{name: getattr(raw, name) for name in GPR_NAMES})


def regs_to_kvm(regs: Regs, raw: Any) -> None:
    for name in GPR_NAMES:
        setattr(raw, name, getattr(regs, name))


def sregs_from_kvm(raw: Any) -> Sregs:
    sregs = Sregs()
    for name in _SEGMENTS:
        seg = getattr(raw, name)
        setattr(sregs, name, Segment(**{f: getattr(seg, f) for f in _SEGMENT_FIELDS}))
    sregs.gdt = DescriptorTable(raw.gdt.base, raw.gdt.limit)
    sregs.idt = DescriptorTable(raw.idt.base, raw.idt.limit)
    for name in _CONTROL:
        setattr(sregs, name, getattr(raw, name))
    return sregs


def sregs_to_kvm(sregs: Sregs, raw: Any) -> None:
    """Write ``sregs`` into ``raw`` (a ``struct kvm_sregs`` read from the vCPU, so
    the pending-interrupt bitmap stays as KVM reported it)."""
    for name in _SEGMENTS:
        seg = getattr(raw, name)
        value = getattr(sregs, name)
        for f in _SEGMENT_FIELDS:
            setattr(seg, f, getattr(value, f))
    raw.gdt.base, raw.gdt.limit = sregs.gdt.base, sregs.gdt.limit
    raw.idt.base, raw.idt.limit = sregs.idt.base, sregs.idt.limit
    for name in _CONTROL:
        setattr(raw, name, getattr(sregs, name))


def fpu_from_kvm(raw: Any) -> Fpu:
    from pyvmm.arch.x86_64_extra_state import Fpu  # see TYPE_CHECKING above

    return Fpu(
        fpr=[bytes(ffi.buffer(raw.fpr[i])) for i in range(8)],
        fcw=raw.fcw,
        fsw=raw.fsw,
        ftwx=raw.ftwx,
        last_opcode=raw.last_opcode,
        last_ip=raw.last_ip,
        last_dp=raw.last_dp,
        xmm=[bytes(ffi.buffer(raw.xmm[i])) for i in range(16)],
        mxcsr=raw.mxcsr,
    )


def fpu_to_kvm(fpu: Fpu, raw: Any) -> None:
    for i, value in enumerate(fpu.fpr[:8]):
        ffi.buffer(raw.fpr[i])[:] = bytes(value).ljust(16, b"\0")[:16]
    for i, value in enumerate(fpu.xmm[:16]):
        ffi.buffer(raw.xmm[i])[:] = bytes(value).ljust(16, b"\0")[:16]
    raw.fcw, raw.fsw, raw.ftwx = fpu.fcw, fpu.fsw, fpu.ftwx
    raw.last_opcode, raw.last_ip, raw.last_dp, raw.mxcsr = fpu.last_opcode, fpu.last_ip, fpu.last_dp, fpu.mxcsr


def debugregs_from_kvm(raw: Any) -> DebugRegs:
    from pyvmm.arch.x86_64_extra_state import DebugRegs  # see TYPE_CHECKING above

    return DebugRegs(db=(raw.db[0], raw.db[1], raw.db[2], raw.db[3]), dr6=raw.dr6, dr7=raw.dr7)


def debugregs_to_kvm(regs: DebugRegs, raw: Any) -> None:
    for i, value in enumerate(regs.db):
        raw.db[i] = value
    raw.dr6, raw.dr7 = regs.dr6, regs.dr7


def cpuid_to_kvm(entries: list[CpuidEntry]) -> Any:
    buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for i, entry in enumerate(entries):
        out = buf.entries[i]
        out.function, out.index, out.flags = entry.function, entry.index, entry.flags
        out.eax, out.ebx, out.ecx, out.edx = entry.eax, entry.ebx, entry.ecx, entry.edx
    return buf


def events_from_kvm(raw: Any) -> VcpuEvents:
    """A ``struct kvm_vcpu_events`` as a record; what its ``flags`` do not mark
    valid is None (``docs/backends/kvm.md`` §6.7).  KVM's shadow bits are
    pyvmm's :class:`InterruptShadow` values (uapi ``asm/kvm.h``; checked by the
    tests)."""
    from pyvmm.arch.x86_64_extra_state import (  # see TYPE_CHECKING above
        ExceptionEvent,
        InterruptEvent,
        InterruptShadow,
        NmiEvent,
        SmiEvent,
        VcpuEvents,
    )

    flags = raw.flags
    payload_valid = bool(flags & k.KVM_VCPUEVENT_VALID_PAYLOAD)
    exception = ExceptionEvent(
        injected=bool(raw.exception.injected),
        pending=bool(raw.exception.pending) if payload_valid else None,
        vector=raw.exception.nr,
        has_error_code=bool(raw.exception.has_error_code),
        error_code=raw.exception.error_code,
        payload=raw.exception_payload if payload_valid and raw.exception_has_payload else None,
    )
    shadow = raw.interrupt.shadow & 3
    interrupt = InterruptEvent(
        injected=bool(raw.interrupt.injected),
        vector=raw.interrupt.nr,
        soft=bool(raw.interrupt.soft),
        shadow=InterruptShadow(shadow) if flags & k.KVM_VCPUEVENT_VALID_SHADOW else None,
    )
    nmi = NmiEvent(
        injected=bool(raw.nmi.injected),
        pending=bool(raw.nmi.pending) if flags & k.KVM_VCPUEVENT_VALID_NMI_PENDING else None,
        masked=bool(raw.nmi.masked),
    )
    smi = SmiEvent(
        smm=bool(raw.smi.smm) if flags & k.KVM_VCPUEVENT_VALID_SMM else None,
        pending=bool(raw.smi.pending),
        inside_nmi=bool(raw.smi.smm_inside_nmi),
        latched_init=bool(raw.smi.latched_init),
    )
    return VcpuEvents(
        exception=exception,
        interrupt=interrupt,
        nmi=nmi,
        smi=smi,
        sipi_vector=raw.sipi_vector if flags & k.KVM_VCPUEVENT_VALID_SIPI_VECTOR else None,
        triple_fault_pending=bool(raw.triple_fault.pending) if flags & k.KVM_VCPUEVENT_VALID_TRIPLE_FAULT else None,
    )


def events_to_kvm(events: VcpuEvents) -> Any:
    """A record as a ``struct kvm_vcpu_events``: a None field leaves its ``flags``
    bit clear, so KVM keeps its own value."""
    raw = ffi.new("struct kvm_vcpu_events *")
    flags = 0
    ex = events.exception
    raw.exception.injected = int(ex.injected)
    raw.exception.nr = ex.vector
    raw.exception.has_error_code = int(ex.has_error_code)
    raw.exception.error_code = ex.error_code
    if ex.pending is not None or ex.payload is not None:
        # Only valid once KVM_CAP_EXCEPTION_PAYLOAD is enabled (else KVM says EINVAL).
        flags |= k.KVM_VCPUEVENT_VALID_PAYLOAD
        raw.exception.pending = int(bool(ex.pending))
        raw.exception_has_payload = int(ex.payload is not None)
        raw.exception_payload = ex.payload or 0
    irq = events.interrupt
    raw.interrupt.injected = int(irq.injected)
    raw.interrupt.nr = irq.vector
    raw.interrupt.soft = int(irq.soft)
    if irq.shadow is not None:
        flags |= k.KVM_VCPUEVENT_VALID_SHADOW
        raw.interrupt.shadow = int(irq.shadow)
    nmi = events.nmi
    raw.nmi.injected = int(nmi.injected)
    raw.nmi.masked = int(nmi.masked)
    if nmi.pending is not None:
        flags |= k.KVM_VCPUEVENT_VALID_NMI_PENDING
        raw.nmi.pending = int(nmi.pending)
    if events.sipi_vector is not None:
        flags |= k.KVM_VCPUEVENT_VALID_SIPI_VECTOR
        raw.sipi_vector = events.sipi_vector
    smi = events.smi
    if smi.smm is not None:
        flags |= k.KVM_VCPUEVENT_VALID_SMM
        raw.smi.smm = int(smi.smm)
    raw.smi.pending = int(smi.pending)
    raw.smi.smm_inside_nmi = int(smi.inside_nmi)
    raw.smi.latched_init = int(smi.latched_init)
    if events.triple_fault_pending is not None:
        flags |= k.KVM_VCPUEVENT_VALID_TRIPLE_FAULT
        raw.triple_fault.pending = int(events.triple_fault_pending)
    raw.flags = flags
    return raw


def routing_to_kvm(routes: list[IrqRoute]) -> Any:
    """A GSI routing table as a ``struct kvm_irq_routing``."""
    buf = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
    for i, route in enumerate(routes):
        entry = buf.entries[i]
        entry.gsi = route.gsi
        if isinstance(route, MsiRoute):
            entry.type = k.KVM_IRQ_ROUTING_MSI
            entry.u.msi.address_lo = route.address & 0xFFFF_FFFF
            entry.u.msi.address_hi = route.address >> 32
            entry.u.msi.data = route.data
        else:
            chip = _IRQCHIPS.get(route.chip)
            if chip is None:
                raise ConfigError(f"routes: KVM x86 routes GSIs to the 8259s and the IOAPIC, not to {route.chip.value}")
            entry.type = k.KVM_IRQ_ROUTING_IRQCHIP
            entry.u.irqchip.irqchip = chip
            entry.u.irqchip.pin = route.pin
    return buf


_IRQCHIPS = {
    IrqChip.PIC_PRIMARY: k.KVM_IRQCHIP_PIC_MASTER,
    IrqChip.PIC_SECONDARY: k.KVM_IRQCHIP_PIC_SLAVE,
    IrqChip.IOAPIC: k.KVM_IRQCHIP_IOAPIC,
}
