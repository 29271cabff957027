"""``pyvmm run --backend unicorn --irqchip userspace`` boots the Multiboot kernel
that needs the 8259s and the PIT, as KVM does (plugins/pyvmm-kvm's
test_kvm_interrupts runs the same kernel).

The kernel's interrupt handlers return with a far return that reloads CS from
the GDT the Multiboot boot state points at, on the 32-bit stack that state
describes: the software CPU must hold the protected-mode descriptor caches the
VMM set, not only their selectors.
"""

from __future__ import annotations

from pathlib import Path

from pyvmm import cli
from pyvmm.testing.guests.multiboot_pic import EXPECTED_STATUS, multiboot_pic_kernel
from pyvmm.vm import Backend


def test_the_pic_kernel_counts_timer_ticks_and_a_com1_interrupt(backend: Backend, tmp_path: Path) -> None:
    kernel = tmp_path / "pic.bin"
    kernel.write_bytes(multiboot_pic_kernel())
    status = cli.main(
        ["run", "--backend", "unicorn", "--kernel", str(kernel), "--irqchip", "userspace", "--serial", "none",
         "--timeout", "60"]
    )  # fmt: skip
    assert status == EXPECTED_STATUS
