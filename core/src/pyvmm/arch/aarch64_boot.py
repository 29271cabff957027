"""aarch64 boot state: the Linux arm64 boot protocol's register contract.

The boot vCPU starts at the entry with X0 = device-tree address, X1..X3 = 0,
PSTATE = EL1h with interrupts masked (Documentation/arch/arm64/booting.rst).
Secondary vCPUs start powered off and are brought up through PSCI.
"""

from __future__ import annotations

from pyvmm.arch.aarch64 import PC_ID, PSTATE_EL1H_DAIF, PSTATE_ID, SP_EL1_ID, x_reg_id
from pyvmm.boot import Aarch64VcpuInit, BootSpec
from pyvmm.errors import ConfigError


def build_aarch64_boot_state(spec: BootSpec) -> Aarch64VcpuInit:
    regs: dict[int, int] = {PC_ID: spec.entry, PSTATE_ID: PSTATE_EL1H_DAIF}
    for n in range(4):
        regs[x_reg_id(n)] = 0
    if spec.fdt_address is not None:
        regs[x_reg_id(0)] = spec.fdt_address
    if spec.stack is not None:
        regs[SP_EL1_ID] = spec.stack
    for name, value in spec.registers.items():
        key = name.lower()
        if key == "sp":
            regs[SP_EL1_ID] = value
            continue
        if not (key.startswith("x") and key[1:].isdigit() and 0 <= int(key[1:]) <= 30):
            raise ConfigError(f"boot register {name!r} is not an aarch64 general register (x0..x30, sp)")
        regs[x_reg_id(int(key[1:]))] = value
    return Aarch64VcpuInit(regs=regs, boot_cpu=True)
