"""A stock Debian kernel (package linux-image-cloud-amd64) boots under pyvmm run.

On this project's machines /dev/kvm is a software KVM (kvm_pvm): the kernel's
decompressor and early boot are interpreted, which takes minutes, and the kernel
later dies on instructions kvm_pvm cannot emulate (QEMU stops there too).  So
here the test boots until the kernel prints "Linux version" on the serial
console and then stops the machine.  On hardware KVM it continues to the end of
the kernel's own boot, until it fails to find a root filesystem: the panic
message proves the whole boot ran, console included.

The boot takes minutes, so it runs where ``PYVMM_LINUX_BOOT=1`` (one tox
environment sets it) and is skipped elsewhere with that reason.
"""

from __future__ import annotations

import glob
import os
import threading
from pathlib import Path

import pytest

from pyvmm.machine.config import MachineConfig
from pyvmm.machine.machine import Machine
from pyvmm.machine.outcome import StopReason
from pyvmm.vm import Backend

BANNER = b"Linux version"
#: Printed by the kernel once it has run all of its own initialisation.
END_OF_BOOT = b"VFS: Unable to mount root fs"


def _kernel() -> Path | None:
    explicit = os.environ.get("PYVMM_LINUX_KERNEL")
    if explicit:
        return Path(explicit)
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    return Path(found[-1]) if found else None


def _software_kvm() -> bool:
    return Path("/sys/module/kvm_pvm").exists()


class ConsoleWatcher:
    """The serial console's output file: keeps what the kernel prints and stops
    the machine once ``marker`` appears."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.text = bytearray()
        self.machine: Machine | None = None
        self.seen = threading.Event()

    def write(self, data: bytes) -> int:
        self.text += data
        if not self.seen.is_set() and self.marker in self.text:
            self.seen.set()
            if self.machine is not None:
                self.machine.request_stop(StopReason.INTERRUPTED, 0, f"saw {self.marker.decode()!r}")
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.skipif(os.environ.get("PYVMM_LINUX_BOOT") != "1", reason="slow: set PYVMM_LINUX_BOOT=1 to boot Linux")
def test_debian_kernel_boots_to_its_banner(kvm: Backend) -> None:
    kernel = _kernel()
    if kernel is None:
        pytest.skip("no /boot/vmlinuz-*-cloud-amd64: apt-get install linux-image-cloud-amd64")
    marker = BANNER if _software_kvm() else END_OF_BOOT
    watcher = ConsoleWatcher(marker)
    config = MachineConfig(
        kernel=kernel,
        append="console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
        memory="512M",
        timeout=900,
    )
    with Machine(config, backend=kvm, serial_output=watcher) as machine:  # type: ignore[arg-type]
        watcher.machine = machine
        result = machine.run()
    tail = bytes(watcher.text[-500:])
    assert watcher.seen.is_set(), f"no {marker!r} on the console; run ended {result}; tail: {tail!r}"
    assert result.reason is StopReason.INTERRUPTED
    assert b"Command line: console=ttyS0" in watcher.text or marker == BANNER
