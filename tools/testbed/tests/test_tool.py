"""The bed's parts that need no QEMU: archive, framing, junit reading, modes,
QEMU's command line and the messages for what is missing."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from testbed import cpio, guest_init, image
from testbed.arches import AMD64, ARM64, arch_named
from testbed.bed import junit_counts
from testbed.errors import MissingTool, UsageError
from testbed.framing import BEGIN, FrameError, decode, encode
from testbed.qemu import command, qemu_binary


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc archive, checking its layout."""
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + name_size - 1].decode()
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[data_start : data_start + size])
        offset = data_start + size + (-size % 4)


def test_cpio_keeps_files_links_and_directories(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/busybox").write_bytes(b"\x7fELF" + bytes(range(7)))
    (tmp_path / "bin/busybox").chmod(0o755)
    (tmp_path / "bin/sh").symlink_to("busybox")
    out = io.BytesIO()
    cpio.write_tree(tmp_path, out)
    entries = read_cpio(out.getvalue())
    assert list(entries) == ["bin", "bin/busybox", "bin/sh"]  # a parent before its children
    assert entries["bin/busybox"] == (0o100755, b"\x7fELF" + bytes(range(7)))
    assert entries["bin/sh"][1] == b"busybox" and entries["bin/sh"][0] & 0o170000 == 0o120000
    assert entries["bin"][0] & 0o170000 == 0o040000


def test_a_result_frame_survives_console_noise() -> None:
    payload = {"exit_status": 0, "junit": "<testsuites/>" * 200}
    console = "boot noise\n[ 1.0] kvm: something\n" + encode(payload) + "[ 9.9] reboot: Power down\n"
    assert decode(console) == payload


def test_a_damaged_frame_is_reported_not_read() -> None:
    framed = encode({"exit_status": 0, "junit": os.urandom(2000).hex()})  # many lines: random data does not shrink
    lines = framed.splitlines()
    lines[3] = lines[3][:10] + "[ 3.1] kernel says hi" + lines[3][10:]  # a printk in mid-line
    with pytest.raises(FrameError, match="damaged"):
        decode("\n".join(lines))
    with pytest.raises(FrameError, match="cut off"):
        decode(framed[: len(framed) // 2])
    with pytest.raises(FrameError, match="no result"):
        decode("Kernel panic - not syncing")
    assert BEGIN in framed


def test_junit_counts_each_outcome() -> None:
    xml = """<testsuites><testsuite>
      <testcase classname="a" name="ok"/>
      <testcase classname="a" name="bad"><failure message="x"/></testcase>
      <testcase classname="a" name="broken"><error message="x"/></testcase>
      <testcase classname="a" name="later"><skipped message="x"/></testcase>
    </testsuite></testsuites>"""
    counts = junit_counts(xml)
    assert (counts.passed, counts.failed, counts.errors, counts.skipped) == (1, 1, 1, 1)
    assert counts.outcomes["a::bad"] == "failed"


def test_modes_are_named_and_unknown_ones_refused() -> None:
    assert [m.name for m in ARM64.modes] == ["vhe", "nvhe", "protected"]
    assert ARM64.mode("protected").cmdline == ("kvm-arm.mode=protected",)
    assert AMD64.mode(None).name == "amd"
    with pytest.raises(UsageError, match=r"no KVM mode 'pkvm'.*vhe, nvhe, protected"):
        ARM64.mode("pkvm")
    with pytest.raises(UsageError, match="no test bed for 'riscv64'"):
        arch_named("riscv64")


def test_wheel_platforms_reach_down_to_manylinux2014() -> None:
    assert ARM64.wheel_platforms[0] == "manylinux_2_36_aarch64"
    assert "manylinux_2_17_aarch64" in ARM64.wheel_platforms


def test_missing_qemu_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingTool, match="apt-get install qemu-system-arm"):
        qemu_binary(ARM64)
    with pytest.raises(MissingTool, match="apt-get install qemu-system-x86"):
        qemu_binary(AMD64)


def test_qemu_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-aarch64"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    argv = command(ARM64, ARM64.mode("nvhe"), Path("/k"), Path("/i"), cpus=2)
    assert argv[0] == str(fake)
    assert "virt,virtualization=on,gic-version=3" in argv and argv[argv.index("-cpu") + 1] == "neoverse-n1"
    append = argv[argv.index("-append") + 1]
    assert "console=ttyAMA0" in append and "kvm-arm.mode=nvhe" in append and "rdinit=/init" in append
    assert argv[argv.index("-smp") + 1] == "2"


def test_init_loads_kvm_amd_without_next_rip_saving() -> None:
    script = guest_init.init_script(AMD64, "6.1.0-0-cloud-amd64")
    loads = [line for line in script.splitlines() if line.startswith("insmod")]
    assert [line.split()[1].rsplit("/", 1)[1] for line in loads] == ["irqbypass.ko", "kvm.ko", "kvm-amd.ko"]
    assert loads[-1].endswith("nrips=0")
    assert "insmod" not in guest_init.init_script(ARM64, "6.1.0-0-cloud-arm64")
    assert "PYVMM_LINUX_BOOT=1" in script  # the x86 kernel boot test runs in the amd64 bed only
    assert "PYVMM_LINUX_BOOT" not in guest_init.init_script(ARM64, "6.1.0-0-cloud-arm64")


def test_both_beds_carry_the_qemu_anchor_and_tell_the_guest_where_it_is() -> None:
    # The Linux-to-userspace tests compare pyvmm with QEMU -accel kvm in the same bed.
    for arch, package, binary in ((ARM64, "qemu-system-arm", "qemu-system-aarch64"),
                                  (AMD64, "qemu-system-x86", "qemu-system-x86_64")):  # fmt: skip
        assert arch.anchor_packages == (package,) and arch.guest_qemu == binary
        script = guest_init.init_script(arch, "6.1.0-0-cloud")
        assert f"export PYVMM_TESTBED_QEMU=/usr/bin/{binary}" in script


def test_a_selection_outside_the_checkout_is_refused(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    base = image.BaseImage(tmp_path / "b.cpio", tmp_path / "k", "6.1", "key")
    with pytest.raises(Exception, match="not a path inside the checkout"):
        image.build_run_layer(AMD64, base, checkout, selection=["../elsewhere"], settings={}, into=tmp_path / "run")


def test_the_arm64_bed_runs_the_kvm_plugins_tests_and_leaves_out_nothing_by_name() -> None:
    """The arm64 backend declares aarch64 guests only, so the x86 scenarios and
    tests skip there with their reason: nothing is left out by a glob."""
    assert "plugins/pyvmm-kvm/tests" in ARM64.default_selection
    assert ARM64.default_pytest_args == ()


def test_the_amd64_bed_runs_the_linux_boot_on_a_periodically_ticking_kernel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Nothing is left out by name, and the bed's kernel keeps a periodic tick, which
    re-raises a timer interrupt QEMU's TCG lost while a nested guest ran (arches.py)."""
    assert AMD64.default_pytest_args == ()
    assert "tools/testbed/guest_tests" in AMD64.default_selection
    qemu = tmp_path / AMD64.qemu
    qemu.write_text("#!/bin/sh\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = command(AMD64, AMD64.mode(None), Path("vmlinuz"), Path("initrd"), cpus=1)
    append = argv[argv.index("-append") + 1].split()
    assert {"nohz=off", "highres=off"} <= set(append)
