"""Guest images bundled with pyvmm.

``demo/`` holds the demo guest ``pyvmm run`` boots when given no kernel: its
source ``demo.S`` and the assembled ``demo.bin`` (checked against each other by
the test suite).  ``demo_aarch64/`` is the same for the aarch64 machine.
"""

from __future__ import annotations

from importlib import resources

from pyvmm.boot import X86Mode
from pyvmm.machine.images import Aarch64Image, GuestImage

#: Where the demo guest is loaded and entered, and its initial stack pointer.
DEMO_LOAD_ADDRESS = 0x10_0000
DEMO_STACK_TOP = 0x9_0000
#: Where the aarch64 demo guest is loaded and entered: the start of the virt
#: board's RAM (:data:`pyvmm.machine.virt.RAM_BASE`).
DEMO_AARCH64_LOAD_ADDRESS = 0x8000_0000


def demo_source() -> str:
    return (resources.files(__package__) / "demo" / "demo.S").read_text(encoding="utf-8")


def demo_binary() -> bytes:
    return (resources.files(__package__) / "demo" / "demo.bin").read_bytes()


def demo_image() -> GuestImage:
    """The demo guest, ready for :class:`pyvmm.machine.Machine`."""
    return GuestImage(
        name="pyvmm demo guest",
        segments=((DEMO_LOAD_ADDRESS, demo_binary()),),
        entry=DEMO_LOAD_ADDRESS,
        mode=X86Mode.LONG,
        stack=DEMO_STACK_TOP,
    )


def demo_aarch64_source() -> str:
    return (resources.files(__package__) / "demo_aarch64" / "demo.S").read_text(encoding="utf-8")


def demo_aarch64_binary() -> bytes:
    return (resources.files(__package__) / "demo_aarch64" / "demo.bin").read_bytes()


def demo_aarch64_image() -> Aarch64Image:
    """The aarch64 demo guest, ready for :class:`pyvmm.machine.Machine` with ``arch="aarch64"``."""
    return Aarch64Image(name="pyvmm aarch64 demo guest", code=demo_aarch64_binary(), address=DEMO_AARCH64_LOAD_ADDRESS)
