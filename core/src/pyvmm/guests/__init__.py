"""Guest images bundled with pyvmm.

``demo/`` holds the demo guest ``pyvmm run`` boots when given no kernel: its
source ``demo.S`` and the assembled ``demo.bin`` (checked against each other by
the test suite).  ``demo_aarch64/`` is the same for the aarch64 machine.
``echo/`` is a tiny interactive shell for the serial console (input through the
16550's receive interrupt): :func:`echo_image`; ``echo_aarch64/`` echoes lines
on the PL011 (polling, so it needs no interrupt controller):
:func:`echo_aarch64_image`.
"""

from __future__ import annotations

import os

from pyvmm.boot import X86Mode
from pyvmm.machine.images import Aarch64Image, GuestImage

#: The bundled files, next to this module: pyvmm installs as files, and
#: importlib.resources would import zipfile (a tenth of a demo run's start-up);
#: os.path rather than pathlib, which a demo run does not otherwise import.
_HERE = os.path.dirname(os.path.abspath(__file__))


def _read_bytes(*parts: str) -> bytes:
    with open(os.path.join(_HERE, *parts), "rb") as file:
        return file.read()


def _read_text(*parts: str) -> str:
    with open(os.path.join(_HERE, *parts), encoding="utf-8") as file:
        return file.read()


#: Where the demo guest is loaded and entered, and its initial stack pointer.
DEMO_LOAD_ADDRESS = 0x10_0000
DEMO_STACK_TOP = 0x9_0000
#: Where the aarch64 demo guest is loaded and entered: the start of the virt
#: board's RAM (:data:`pyvmm.machine.virt.RAM_BASE`).
DEMO_AARCH64_LOAD_ADDRESS = 0x8000_0000


def demo_source() -> str:
    return _read_text("demo", "demo.S")


def demo_binary() -> bytes:
    return _read_bytes("demo", "demo.bin")


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
    return _read_text("demo_aarch64", "demo.S")


def demo_aarch64_binary() -> bytes:
    return _read_bytes("demo_aarch64", "demo.bin")


def demo_aarch64_image() -> Aarch64Image:
    """The aarch64 demo guest, ready for :class:`pyvmm.machine.Machine` with ``arch="aarch64"``."""
    return Aarch64Image(name="pyvmm aarch64 demo guest", code=demo_aarch64_binary(), address=DEMO_AARCH64_LOAD_ADDRESS)


#: Where the echo guest is loaded and entered (``--load-address 0x100000``).
ECHO_LOAD_ADDRESS = 0x10_0000


def echo_source() -> str:
    return _read_text("echo", "echo.S")


def echo_binary() -> bytes:
    return _read_bytes("echo", "echo.bin")


def echo_path() -> str:
    """The echo guest's file, for ``pyvmm run --kernel PATH --load-address 0x100000``."""
    return os.path.join(_HERE, "echo", "echo.bin")


def echo_image() -> GuestImage:
    """The echo guest (needs the hypervisor's interrupt controllers), ready for
    :class:`pyvmm.machine.Machine`."""
    return GuestImage(
        name="pyvmm echo guest",
        segments=((ECHO_LOAD_ADDRESS, echo_binary()),),
        entry=ECHO_LOAD_ADDRESS,
        mode=X86Mode.LONG,
        stack=DEMO_STACK_TOP,
    )


def echo_aarch64_source() -> str:
    return _read_text("echo_aarch64", "echo.S")


def echo_aarch64_binary() -> bytes:
    return _read_bytes("echo_aarch64", "echo.bin")


def echo_aarch64_path() -> str:
    """For ``pyvmm run --arch aarch64 --kernel PATH --load-address 0x80000000``."""
    return os.path.join(_HERE, "echo_aarch64", "echo.bin")


def echo_aarch64_image() -> Aarch64Image:
    """The aarch64 echo guest, ready for :class:`pyvmm.machine.Machine` with ``arch="aarch64"``."""
    return Aarch64Image(name="pyvmm aarch64 echo guest", code=echo_aarch64_binary(), address=DEMO_AARCH64_LOAD_ADDRESS)
