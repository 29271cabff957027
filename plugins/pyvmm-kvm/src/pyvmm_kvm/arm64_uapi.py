"""The arm64 half of the KVM uapi that :mod:`pyvmm_kvm.bindings` does not carry.

Constants only, from ``arch/arm64/include/uapi/asm/kvm.h`` and the arm64 parts of
``include/uapi/linux/kvm.h``; the structs (``kvm_vcpu_init``, the arm64
``kvm_regs``) and the ioctl numbers are in :data:`pyvmm_kvm.bindings.ffi_aarch64`
and :mod:`pyvmm_kvm.bindings`.  ``tests/test_arm64_layout.py`` compiles every name
here against the arm64 uapi with the aarch64 cross compiler.  Kept apart from the
x86 bindings so that an arm64 change never touches the x86 exit path.

Linux 6.1 (Debian 12's kernels) has no protected-VM type on arm64: upstream
``kvm-arm.mode=protected`` deprivileges the host but offers userspace no
``KVM_VM_TYPE_ARM_PROTECTED`` and no pKVM capability (both exist only in
Android's kernels), so there is nothing here to ask for one.
"""

from __future__ import annotations

from typing import Final

from pyvmm.arch.aarch64 import REG_ARM64_SYSREG
from pyvmm_kvm.bindings import KVM_REG_ARM64, KVM_REG_ARM_COPROC_SHIFT, KVM_REG_SIZE_U64

# --- KVM_ARM_VCPU_INIT features (asm/kvm.h) beyond bindings' POWER_OFF..PMU_V3 ---
KVM_ARM_VCPU_SVE: Final = 4
KVM_ARM_VCPU_PTRAUTH_ADDRESS: Final = 5
KVM_ARM_VCPU_PTRAUTH_GENERIC: Final = 6

# --- one-reg id fields (asm/kvm.h) beyond bindings' KVM_REG_ARM64 / KVM_REG_SIZE_* ---
KVM_REG_ARM_COPROC_MASK: Final = 0x000000000FFF0000
KVM_REG_ARM_DEMUX: Final = 0x0011 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG: Final = REG_ARM64_SYSREG
KVM_REG_ARM_FW: Final = 0x0014 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SVE: Final = 0x0015 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_PSCI_VERSION: Final = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | 0

# --- KVM_GET/SET_MP_STATE on arm64 (linux/kvm.h) beyond bindings' RUNNABLE/STOPPED ---
KVM_MP_STATE_SUSPENDED: Final = 10

# --- devices (linux/kvm.h enum kvm_device_type, KVM_CREATE_DEVICE) ---
KVM_DEV_TYPE_ARM_VGIC_V2: Final = 5
KVM_DEV_TYPE_ARM_VGIC_V3: Final = 7
KVM_DEV_TYPE_ARM_VGIC_ITS: Final = 8
KVM_CREATE_DEVICE_TEST: Final = 1

# --- the vGIC's device attributes (asm/kvm.h) ---
KVM_DEV_ARM_VGIC_GRP_ADDR: Final = 0
KVM_DEV_ARM_VGIC_GRP_DIST_REGS: Final = 1
KVM_DEV_ARM_VGIC_GRP_NR_IRQS: Final = 3
KVM_DEV_ARM_VGIC_GRP_CTRL: Final = 4
KVM_DEV_ARM_VGIC_GRP_REDIST_REGS: Final = 5
KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS: Final = 6
KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO: Final = 7
KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT: Final = 10
KVM_DEV_ARM_VGIC_CTRL_INIT: Final = 0
KVM_VGIC_V3_ADDR_TYPE_DIST: Final = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST: Final = 3
KVM_VGIC_V3_DIST_SIZE: Final = 0x10000
KVM_VGIC_V3_REDIST_SIZE: Final = 2 * 0x10000
KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT: Final = 32

# --- KVM_IRQ_LINE's irq field on arm64 (asm/kvm.h; api.rst "KVM_IRQ_LINE") ---
KVM_ARM_IRQ_VCPU2_SHIFT: Final = 28
KVM_ARM_IRQ_TYPE_SHIFT: Final = 24
KVM_ARM_IRQ_VCPU_SHIFT: Final = 16
KVM_ARM_IRQ_NUM_SHIFT: Final = 0
KVM_ARM_IRQ_NUM_MASK: Final = 0xFFFF
KVM_ARM_IRQ_TYPE_CPU: Final = 0
KVM_ARM_IRQ_TYPE_SPI: Final = 1
KVM_ARM_IRQ_TYPE_PPI: Final = 2
KVM_ARM_IRQ_CPU_IRQ: Final = 0
KVM_ARM_IRQ_CPU_FIQ: Final = 1

# --- capabilities only arm64 answers (linux/kvm.h) ---
KVM_CAP_ARM_USER_IRQ: Final = 144
KVM_CAP_ARM_INJECT_SERROR_ESR: Final = 158
KVM_CAP_ARM_IRQ_LINE_LAYOUT_2: Final = 174

# --- KVM_CREATE_VM's type on arm64: the IPA size in bits (0 = the 40-bit default) ---
KVM_VM_TYPE_ARM_IPA_SIZE_MASK: Final = 0xFF

#: Not uapi: the vGIC's private interrupts (SGIs 0-15, PPIs 16-31) come before
#: the SPIs, so SPI n is INTID n + 32 (``VGIC_NR_PRIVATE_IRQS``, include/kvm/arm_vgic.h).
VGIC_NR_PRIVATE_IRQS: Final = 32
#: Not uapi: the SPIs a vGIC has unless told otherwise (``kvm_vgic_dist_init``:
#: ``VGIC_NR_IRQS_LEGACY`` 256 less the private ones).
VGIC_DEFAULT_SPIS: Final = 256 - VGIC_NR_PRIVATE_IRQS
#: Not uapi: the INTIDs KVM gives the EL1 virtual and physical timers unless
#: userspace moves them (``default_vtimer_irq`` / ``default_ptimer_irq``,
#: arch/arm64/kvm/arch_timer.c).
VTIMER_INTID: Final = 27
PTIMER_INTID: Final = 30
