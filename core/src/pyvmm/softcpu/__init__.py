"""A software CPU that stops where a hypervisor would exit.

:class:`SoftCpu` runs one x86_64 or aarch64 vCPU on the `unicorn
<https://www.unicorn-engine.org>`_ engine (QEMU's TCG) and returns pyvmm exits
from :meth:`SoftCpu.run`.  It is the execution engine of the example backend
``pyvmm-unicorn`` and of the driver models that stand in for hypervisors that
cannot run here (Gunyah, GenieZone, WHPX, HAXM).  It knows nothing about
pluggy: a backend's hooks or a model's ``RUN`` handler wrap it.

unicorn is an optional extra (``pip install 'pyvmm-core[softcpu]'``) and is
imported when the first :class:`SoftCpu` is made, never by ``import
pyvmm.softcpu``; :func:`available` answers "can it run here?" for probes.

::

    cpu = SoftCpu("x86_64")
    cpu.map_region(region)             # zero-copy: the guest uses region.host_addr
    cpu.init(vm.boot_state_for(0))     # registers from pyvmm.boot
    exit_ = cpu.run()                  # an IoExit, MmioExit, HltExit, ...

What it models
==============

* **Memory.**  RAM regions are the owner's host pages, mapped with
  ``uc_mem_map_ptr`` (no copy; writes either side are seen by the other).  A
  read-only region is mapped without write permission.  Regions can be removed
  again, also while another thread runs the vCPU (the change is handed to the
  vCPU thread between two instructions and waited for).  ``log_dirty`` regions
  record written pages.
* **MMIO.**  An access to guest-physical memory no RAM backs -- or a write to a
  read-only region -- stops the guest *before* the instruction completes and is
  an :class:`~pyvmm.exits.MmioExit`.  The next :meth:`~SoftCpu.run` re-executes
  the instruction with the touched page mapped as emulated I/O that answers the
  reported access: a read gets the ``exit.data`` the VMM wrote, a write is
  absorbed (read-only RAM keeps its contents; reads of it still see them).  Any
  width unicorn uses, up to 8 bytes.  An instruction with several MMIO accesses
  gets one exit per access, in program order (its registers are rolled back
  while accesses are outstanding); a read-modify-write reports the read, then
  the write.  If RAM is mapped where a reported access went before the next
  run, the instruction is re-executed against that RAM instead.
* **Port I/O (x86).**  ``IN``/``OUT`` and the ``REP INS``/``REP OUTS`` string
  forms stop right after the access with an :class:`~pyvmm.exits.IoExit` of
  one item (``count == 1``); string forms give one exit per item.  Between the
  exit and the next run, RIP points at the I/O instruction, which the next run
  re-executes to hand the guest the VMM's data.
* **String I/O batches (x86)**, ``SoftCpu(string_batch=N)`` with exits after
  the access: an ``INS``/``OUTS`` (with or without REP) is one
  :class:`~pyvmm.softcpu.exits.StringIoExit` (an ``IoExit``, ``kind`` IO)
  carrying up to ``N`` bytes of items -- at least one, never past the guest
  buffer's page, the REP count or the index register's wrap::

      exit_.port, exit_.size, exit_.count  # count items of size bytes
      exit_.is_write                       # OUTS: data holds the items
      exit_.df                             # RFLAGS.DF: the buffer descends
      exit_.gva, exit_.gpa                 # the first item's linear / physical address
      exit_.data                           # count * size bytes, in transfer order

  Item ``k`` lives at ``gva + k * size`` (``gva - k * size`` with ``df``).
  The VMM fills ``data`` for ``INS``; the next run completes the whole batch
  as KVM and HAXM do: the items go to guest memory (dirty-logged), RSI/RDI
  move by ``count * size``, RCX drops by ``count`` under REP, and RIP moves
  past the instruction once RCX reaches 0 -- until then RIP stays on it and
  the next run makes the next batch.  KVM's ``io.count`` and data page are
  ``count`` and ``data``.  The batch's memory is ``[gva, gva + count * size)``,
  or with ``df`` ``[gva - (count - 1) * size, gva + size)``, item by item in
  reverse of ``data`` -- what a model needs whose hypervisor copies its I/O
  buffer to or from guest memory as one block (HAXM's ``handle_io_post``).
  A buffer that is not RAM (MMIO, read-only for ``INS``, or not mapped in
  the guest's page tables) goes item by item as plain ``IoExit`` s, so the
  CPU raises the page fault where there is one.
* **HLT / WFI** are a :class:`~pyvmm.exits.HltExit`, unless an interrupt is
  waiting (an injected x86 event, or a GIC interrupt signalled to an attached
  aarch64 vCPU), which wakes the vCPU instead.  aarch64 ``WFE`` is a no-op.
* **Exit timing (x86).**  By default an access is completed by the next run,
  as KVM and HAXM do.  ``exit_timing="before"`` stops *before* the instruction
  (WHPX's timing): the exit carries the instruction bytes, the GVA and the
  GPA, and the VMM finishes the access itself -- :mod:`pyvmm.softcpu.x86_emulate`
  computes the registers after it -- and advances RIP.  Intercepted CPUID and
  RDMSR/WRMSR exit before the instruction too: registers unchanged, a
  ``CpuidExit`` carrying unicorn's own answer as the default (the instruction
  is executed for it and rolled back), an ``MsrAccessExit`` the index and, for
  a write, the value; the VMM writes the results and moves RIP.
* **aarch64 GICv3** (:mod:`pyvmm.softcpu.gic`): a distributor, a redistributor
  per vCPU, the CPU interface through the ICC system registers and the virtual
  timer on PPI 27; IRQs enter the guest through VBAR_EL1.
* **x86 exceptions** (a fault, ``UD2``, ``INT n``): when the guest's IDT has no
  present gate for the vector -- what ends in a triple fault on hardware -- the
  exit is a :class:`~pyvmm.exits.ShutdownExit` (``TRIPLE_FAULT``,
  ``raw_error_code`` = the vector); otherwise the gate's handler runs.
* **aarch64 HVC/SMC** go to :attr:`SoftCpu.hypercall_handler` first (see
  :data:`HypercallHandler`); by default PSCI ``SYSTEM_OFF``/``SYSTEM_RESET``
  are a :class:`~pyvmm.exits.SystemEventExit` (``SHUTDOWN``/``RESET``),
  ``PSCI_VERSION`` (1.0) and ``PSCI_FEATURES`` are answered, other PSCI calls
  return NOT_SUPPORTED, and other function ids are a
  :class:`~pyvmm.exits.HypercallExit` whose ``result`` (default
  NOT_SUPPORTED) goes to X0 on the next run.  Other aarch64 exceptions are an
  :class:`~pyvmm.exits.InternalErrorExit`.
* **Registers.**  x86 :class:`~pyvmm.arch.x86_64.Regs` and
  :class:`~pyvmm.arch.x86_64.Sregs` (real, 16- and 32-bit protected,
  compatibility and 64-bit mode, segment caches as given -- every state
  :func:`pyvmm.arch.x86_64_boot.build_x86_boot_state` builds), the x87/SSE
  state as :class:`~pyvmm.arch.x86_64_extra_state.Fpu` (FXSAVE's layout; a
  new CPU's is KVM's reset state) and the debug registers, x86 events
  as :class:`~pyvmm.arch.x86_64.VcpuEvents`; aarch64 registers by
  KVM one-reg id and as :class:`~pyvmm.arch.aarch64.CoreRegs`.
* **Kick.**  :meth:`SoftCpu.kick` from any thread makes the current or next
  run return an :class:`~pyvmm.exits.InterruptedExit` (``uc_emu_stop``,
  repeated by a watchdog until the vCPU thread has seen it, because unicorn
  forgets a stop that lands between two emulation slices).  An instruction
  whose exit was just reported (a port or MMIO access) is finished first, as
  KVM does, so the registers read after a kicked run are past it.
* **Debug.**  Single-stepping and breakpoints end a run with a
  :class:`~pyvmm.exits.DebugExit`.

What unicorn cannot model (and the engine does not pretend to)
================================================================

* **x86 segment registers** are more than unicorn's register interface can
  set: it writes a selector but not the hidden descriptor cache behind it
  (only FS and GS load a descriptor), and its fresh state is a pseudo long
  mode.  ``set_sregs`` therefore moves the CPU into the requested mode with
  control-register writes from that fresh state, then writes every segment's
  descriptor cache and QEMU's mode flags (CPL, code and stack size, LMA,
  64-bit code) into the engine's saved context -- their places are probed,
  not assumed.  Real mode (the reset state included: CS F000, base FFFF0000),
  16-bit protected mode and segments with any base and limit are set as
  given.  A guest that switches modes itself (far jumps, ``lgdt``) is executed
  faithfully by QEMU.  Only if the probe fails (another unicorn build) are
  real mode, 16-bit code and non-flat segments refused with
  :class:`~pyvmm.errors.ConfigError`.
* **x86 events** (:meth:`SoftCpu.inject_interrupt`, ``inject_nmi``,
  ``inject_exception``, ``request_interrupt_window``) are delivered through
  the guest's IVT/IDT as the CPU does: a gate into a more privileged code
  segment switches to the TSS's stack for that level (SS0:ESP0 in 32-bit
  protected mode, RSP0 and a null SS in long mode), a long-mode gate with an
  IST index to that IST stack, and CS/SS and CPL are loaded.  16-bit gates
  and TSSs, task gates, virtual-8086 mode and whatever the CPU would fault on
  while delivering are an :class:`~pyvmm.exits.InternalErrorExit` naming
  the reason (a ``ModelGap`` for a driver model).  An injected exception goes first,
  whatever IF says, and pushes the error code it was given (protected and
  long mode).  Exceptions the guest raises are delivered through its gates
  too, with the error code QEMU recorded (read from the engine's context,
  where it is probed, not assumed; INT n pushes none).  unicorn skips QEMU's
  own delivery, which would end the exception "in flight": the software CPU
  ends it, so a later fault is not taken for a double fault.  While an event
  waits for IF or the STI/MOV SS shadow (QEMU's, read back), the guest is
  stepped.  :meth:`SoftCpu.get_vcpu_events` / ``set_vcpu_events`` read and
  write all of it as a :class:`~pyvmm.arch.x86_64.VcpuEvents`.
  CPUID, RDMSR/WRMSR and RDTSC/RDTSCP become exits with ``intercept``
  (:class:`~pyvmm.softcpu.exits.RdtscExit` for the TSC: set ``tsc``, and
  ``aux`` for RDTSCP, before the next run).
* **Segment descriptor caches** are read back from the engine's saved
  context, so ``get_sregs`` reports what the CPU holds however the segment was
  loaded (QEMU keeps no "unusable" flag: a segment that is not present reads
  as unusable).  ``apic_base`` is stored, not modelled.  ``set_sregs``
  restarts the CPU from its fresh state: general registers, the x87/SSE
  state, the debug registers and the syscall MSRs are kept.  The debug
  registers are stored, not acted on (hardware breakpoints come from
  ``set_guest_debug``).
* **No x86 interrupt controller** (no local APIC or IOAPIC: the machine
  layer's userspace 8259/8254 drive x86 injection), and the GIC models no SGIs,
  group 0, binary-point preemption, LPIs/ITS or EOImode 1; an IRQ taken at EL1
  on SP_EL0 does not switch stacks.  Hence no ``IRQCHIP``, ``IRQ_LINE``,
  ``IRQFD`` or ``PVCLOCK``.
* **CPUID, MSRs and the TSC** without ``intercept`` are unicorn's own CPU
  model's, and ``RDMSR`` of an unknown MSR does not fault.
* **One vCPU per engine**, and guest memory shared between engines is coherent
  for data only: translated code is per engine.  Code written by the *host*
  into guest memory is only seen after :meth:`SoftCpu.invalidate_code` (done at
  every run unless ``coherent_code=False``).
* **Edge cases of MMIO:** an access crossing a page boundary is split by QEMU
  (possibly into single bytes); a string port instruction whose memory operand
  is MMIO, or code executing from a read-only region it also writes, is not
  supported; instruction fetch from unbacked memory is an
  :class:`~pyvmm.exits.InternalErrorExit` (as on KVM).  Dirty logging misses
  the accessed/dirty bits the MMU sets in page tables.
* **Speed.**  TCG translates guest code to host code, so guest instructions
  run fast, but every exit goes through Python: measured here, ~25 µs per port
  I/O exit and ~180 µs per MMIO exit (the re-execution maps a scratch page),
  plus ~35 µs per run with ``coherent_code`` (translations are dropped and
  redone).  A hardware hypervisor's exit costs ~7 µs.
"""

from __future__ import annotations

from pyvmm.softcpu._uc import SoftCpuUnavailable, available
from pyvmm.softcpu.engine import Conduit, Hypercall, HypercallHandler, SoftCpu
from pyvmm.softcpu.exits import RdtscExit, StringIoExit

__all__ = [
    "Conduit",
    "Hypercall",
    "HypercallHandler",
    "RdtscExit",
    "SoftCpu",
    "SoftCpuUnavailable",
    "StringIoExit",
    "available",
]
