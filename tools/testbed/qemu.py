"""Boots the guest under QEMU (TCG) with a hard timeout and keeps its console."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .arches import Arch, KvmMode
from .errors import GuestTimeout, MissingTool

MEMORY = "2048"


@dataclass(frozen=True)
class Boot:
    console: str
    exit_status: int
    seconds: float


def qemu_binary(arch: Arch) -> str:
    found = shutil.which(arch.qemu)
    if found is None:
        raise MissingTool(
            f"no {arch.qemu}: the {arch.name} test bed boots its guest under QEMU -- "
            f"apt-get install {arch.qemu_package}"
        )
    return found


def command(arch: Arch, mode: KvmMode, kernel: Path, initrd: Path, *, cpus: int, extra_append: str = "") -> list[str]:
    append = " ".join([f"console={arch.console}", "panic=-1", "rdinit=/init", *mode.cmdline, extra_append]).strip()
    return [
        qemu_binary(arch),
        *arch.machine_args,
        "-smp", str(cpus),
        "-m", MEMORY,
        "-nodefaults",  # no NIC, VGA or floppy to probe: only the console
        "-display", "none",
        "-serial", "stdio",
        "-no-reboot",  # a panic (panic=-1) or a reboot ends QEMU
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", append,
    ]  # fmt: skip


def boot(argv: list[str], timeout: float, echo: Callable[[str], None] | None = None) -> Boot:
    """Run QEMU until it exits; kill it (and raise) after ``timeout`` seconds."""
    started = time.monotonic()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    assert process.stdout is not None
    chunks: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace").replace("\r", "")
            chunks.append(line)
            if echo is not None:
                echo(line)

    reader = threading.Thread(target=read, name="testbed-console", daemon=True)
    reader.start()
    try:
        status = process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join(5)
        tail = "".join(chunks)[-2000:]
        message = f"the guest did not finish within {timeout:.0f} s; the console's last lines:\n{tail}"
        raise GuestTimeout(message) from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(10)
    process.stdout.close()
    return Boot("".join(chunks), status, time.monotonic() - started)
