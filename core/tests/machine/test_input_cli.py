"""``pyvmm run`` with hostile or careless input (issue 10, items 7 and 8): every
file option refuses a FIFO, a device, a directory or a missing file with one
line naming the option, without blocking; ``--timeout`` covers loading; Ctrl-C
while loading and out-of-range values end with the documented status and no
traceback."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from coretests_support import MakeBackend
from machinetests_support import MACHINE_CAPS, io_exit

from pyvmm import cli
from pyvmm.machine import loaders
from pyvmm.machine.outcome import STATUS_ERROR, STATUS_INTERRUPTED, STATUS_TIMEOUT

#: Long enough for a slow CI machine, far shorter than "blocks forever".
PROMPT = 20.0
#: A Multiboot kernel by the header's load addresses (flag 16): loaded at 1 MiB, entered at its hlt.
_FLAGS = 1 << 16
MULTIBOOT_KERNEL = (
    struct.pack("<III", 0x1BADB002, _FLAGS, -(0x1BADB002 + _FLAGS) & 0xFFFFFFFF)
    + struct.pack("<5I", 0x10_0000, 0x10_0000, 0, 0, 0x10_0020)
    + b"\xf4" * 0x20
)


@pytest.fixture
def scripted(make_backend: MakeBackend) -> Any:
    test_backend, _ = make_backend(MACHINE_CAPS, name="scripted")
    return test_backend


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    yield path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``pyvmm run ARGV`` in this process, bounded in time: a hang fails the test
    instead of stalling the suite (the watchdog opens any FIFO left waiting)."""
    started = time.monotonic()
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(PROMPT):
            for arg in argv:  # unblock an open() waiting for a FIFO's other end
                if os.path.exists(arg) and Path(arg).is_fifo():
                    fd = os.open(arg, os.O_RDWR | os.O_NONBLOCK)
                    os.close(fd)

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    try:
        status = cli.main(["run", "-q", "--backend", "scripted", *argv])  # -q: the backend line has its own tests
    finally:
        done.set()
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert elapsed < PROMPT, f"pyvmm run {argv} took {elapsed:.1f} s: it blocked"
    assert "Traceback" not in err
    return status, err


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyvmm: error: "), err
    return lines[0]


@pytest.mark.parametrize("option", ["--kernel", "--initrd"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "missing"])
def test_file_options_refuse_what_is_not_a_regular_file(
    scripted: Any, tmp_path: Path, fifo: Path, capsys: pytest.CaptureFixture[str], option: str, kind: str
) -> None:
    target = {"fifo": fifo, "dev-zero": Path("/dev/zero"), "directory": tmp_path, "missing": tmp_path / "nope"}[kind]
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(MULTIBOOT_KERNEL)  # a kernel that takes an initrd
    argv = ["--kernel", str(target)] if option == "--kernel" else ["--kernel", str(kernel), "--initrd", str(target)]
    status, err = run([*argv, "--serial", "none"], capsys)
    assert status == STATUS_ERROR
    line = one_error(err)
    assert line.startswith(f"pyvmm: error: {option}: {target}: "), line
    expected = {
        "fifo": "is a FIFO (named pipe), not a regular file",
        "dev-zero": "is a character device, not a regular file",
        "directory": "is a directory, not a regular file",
        "missing": "file does not exist",
    }[kind]
    assert expected in line
    assert scripted.calls_of("pyvmm_create_vcpu") == []


def test_a_kernel_larger_than_guest_ram_is_refused_before_it_is_read(
    scripted: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = tmp_path / "huge.bin"
    with kernel.open("wb") as file:
        file.truncate(1 << 40)  # sparse: a terabyte that costs nothing
    status, err = run(["--kernel", str(kernel), "--memory", "64M"], capsys)
    assert status == STATUS_ERROR
    assert "--kernel: " in one_error(err) and "1024 GiB: it does not fit in guest RAM (64 MiB)" in err


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "missing", "huge"])
def test_config_refuses_what_is_not_a_small_regular_file(
    scripted: Any, tmp_path: Path, fifo: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    huge = tmp_path / "huge.toml"
    with huge.open("wb") as file:
        file.truncate(64 << 20)
    target = {
        "fifo": fifo,
        "dev-zero": Path("/dev/zero"),
        "directory": tmp_path,
        "missing": tmp_path / "nope.toml",
        "huge": huge,
    }[kind]
    status, err = run(["--config", str(target)], capsys)
    assert status == STATUS_ERROR
    line = one_error(err)
    assert line.startswith(f"pyvmm: error: --config: {target}: cannot read the machine file: it "), line


def test_serial_to_a_fifo_without_a_reader_is_refused_not_waited_on(
    scripted: Any, fifo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = run(["--serial", str(fifo)], capsys)
    assert status == STATUS_ERROR
    assert one_error(err) == f"pyvmm: error: --serial: {fifo} is a FIFO with no reader (start the reader first)"


def test_serial_to_a_fifo_with_a_reader_gets_the_output(
    scripted: Any, fifo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.script_exits(
        io_exit(0x3F8, 1, write=True, value=ord("A")),
        io_exit(0x3F8, 1, write=True, value=ord("\n")),
        io_exit(0xF4, 1, write=True, value=0),
    )
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        status, _ = run(["--serial", str(fifo)], capsys)
        assert status == 1
        assert os.read(reader, 16) == b"A\n"
    finally:
        os.close(reader)


def test_serial_to_dev_full_is_a_one_line_error(scripted: Any, capsys: pytest.CaptureFixture[str]) -> None:
    scripted.script_exits(
        io_exit(0x3F8, 1, write=True, value=ord("A")),
        io_exit(0x3F8, 1, write=True, value=ord("\n")),
        io_exit(0xF4, 1, write=True, value=0),
    )
    status, err = run(["--serial", "/dev/full"], capsys)
    assert status == STATUS_ERROR
    line = one_error(err)
    assert "--serial: cannot write the console output to /dev/full: No space left on device" in line


@pytest.mark.parametrize("target", ["directory", "kernel"])
def test_serial_never_overwrites_an_input_or_writes_a_directory(
    scripted: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(b"\xf4")
    serial = tmp_path if target == "directory" else kernel
    argv = ["--kernel", str(kernel), "--load-address", "0x100000", "--serial", str(serial)]
    status, err = run(argv, capsys)
    assert status == STATUS_ERROR
    assert one_error(err).startswith(f"pyvmm: error: --serial: {serial} is ")
    assert kernel.read_bytes() == b"\xf4"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("inf", "--timeout: inf is out of range: must be above 0 and at most 1e+09"),
        ("nan", "--timeout: nan is out of range"),
        ("-1", "--timeout: -1.0 is out of range"),
        ("0", "--timeout: 0.0 is out of range"),
        ("1e10", "--timeout: 10000000000.0 is out of range"),
    ],
)
def test_timeout_values(scripted: Any, capsys: pytest.CaptureFixture[str], value: str, expected: str) -> None:
    status, err = run(["--timeout", value, "--serial", "none"], capsys)
    assert status == STATUS_ERROR
    assert expected in one_error(err)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpus = true\n", "cpus: must be an integer from 1 to 254, not True"),
        ("cpus = 2.0\n", "cpus: must be an integer from 1 to 254, not 2.0"),
        ("timeout = true\n", "timeout: must be a finite number above 0 and at most 1e+09, not True"),
        ("timeout = inf\n", "timeout: inf is out of range"),
        ('stats = "yes"\n', "stats: must be true or false, not 'yes'"),
        ("load_address = -1\n", "load_address: -1 is out of range"),
        ('kernel = "k\\u0000.bin"\n', "kernel: must not contain a NUL character"),
        ("[[cpuid_overrides]]\nfunction = true\nregister = 'eax'\nvalue = 1\n", "cpuid_overrides.0.function"),
        ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
)
def test_machine_file_values_are_strict(
    scripted: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    file = tmp_path / "m.toml"
    file.write_text(text)
    status, err = run(["--config", str(file), "--serial", "none"], capsys)
    assert status == STATUS_ERROR
    assert expected in one_error(err)


def test_non_utf8_append_is_a_one_line_error(scripted: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(b"\xf4")
    append = os.fsdecode(b"console=\xff")  # what Python makes of a non-UTF-8 argv byte
    status, err = run(["--kernel", str(kernel), "--append", append], capsys)
    assert status == STATUS_ERROR
    assert "--append: is not valid UTF-8 (byte 0xff at character 8)" in one_error(err)


class SpinningGuest:
    """Stands in for the contract backend's exit queue: a guest that writes the
    POST port forever, until the machine stops it."""

    def __bool__(self) -> bool:
        return True

    def popleft(self) -> Any:
        time.sleep(0.001)
        return io_exit(0x80, 1, write=True, value=0)


def _slow_load(seconds: float, interrupt: bool = False) -> Any:
    def load_kernel(*args: Any, **kwargs: Any) -> Any:
        if interrupt:
            signal.raise_signal(signal.SIGINT)
        time.sleep(seconds)
        raise AssertionError("the load should have been cut short")

    return load_kernel


def test_timeout_covers_loading(
    scripted: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"\x7fELF")
    monkeypatch.setattr(loaders, "load_kernel", _slow_load(30))
    started = time.monotonic()
    status, err = run(["--kernel", str(kernel), "--timeout", "0.3", "--serial", "none"], capsys)
    assert status == STATUS_TIMEOUT
    assert time.monotonic() - started < 10
    assert err.startswith("pyvmm: timeout: timeout after ") and "before the guest started" in err
    assert scripted.calls_of("pyvmm_create_vcpu") == []
    assert scripted.vms[0].destroyed
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_the_deadline_counts_loading_time_for_the_run(
    scripted: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load that takes most of --timeout leaves the guest only the rest; the
    spinning guest (port reads forever) is stopped with status 124."""
    real_load = loaders.load_kernel

    def slow_then_real(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.4)
        return real_load(*args, **kwargs)

    kernel = tmp_path / "k.bin"
    kernel.write_bytes(b"\xf4")
    scripted._exits = SpinningGuest()
    monkeypatch.setattr(loaders, "load_kernel", slow_then_real)
    started = time.monotonic()
    argv = ["--kernel", str(kernel), "--load-address", "0x100000", "--timeout", "0.6", "--serial", "none"]
    status, err = run(argv, capsys)
    elapsed = time.monotonic() - started
    assert status == STATUS_TIMEOUT
    assert "pyvmm: timeout: timeout after 0.6 s" in err
    assert elapsed < 0.6 + 0.4 + 5  # not 0.4 of loading and then another full 0.6


def test_ctrl_c_while_loading_exits_130_without_a_traceback(
    scripted: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"\x7fELF")
    monkeypatch.setattr(loaders, "load_kernel", _slow_load(30, interrupt=True))
    status, err = run(["--kernel", str(kernel), "--serial", "none"], capsys)
    assert status == STATUS_INTERRUPTED
    assert err.strip() == "pyvmm: interrupted: interrupted (Ctrl-C)"
    assert scripted.vms[0].destroyed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
