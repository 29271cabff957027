"""/init of the bed's guest: a busybox script that mounts what the tests need,
loads KVM's modules, says where the Linux payload and QEMU are, and starts the
bed's guest program.  Kept apart from :mod:`image` so that a change here rebuilds
only the run's own layer, never the cached base."""

from __future__ import annotations

from .arches import AMD64, Arch

#: Set in the guest: what emulates the CPU that the guest's KVM runs on.
EMULATOR_VARIABLE = "PYVMM_TESTBED_EMULATOR"
#: Where the guest finds the kernel and busybox initramfs (laid out by :mod:`image`).
LINUX_DIR = "opt/linux"
#: What that initramfs prints once userspace runs, with the online CPU count.
USERSPACE_MARKER = "PYVMM-USERSPACE-MARKER"
#: Where the checkout's selected tests are, and the guest's pytest runs.
GUEST_CHECKOUT = "/checkout"


def init_script(arch: Arch, kernel_version: str) -> str:
    """/init: mounts, KVM's modules, then the bed's guest program (``testbed.guest``)."""
    lines = [
        "#!/bin/busybox sh",
        "/bin/busybox --install -s /bin",
        "export PATH=/bin:/usr/bin:/sbin:/usr/sbin",
        "mkdir -p /proc /sys /dev /tmp",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        "mount -t tmpfs tmpfs /tmp",
        # ptys for the console tests, loopback for the gdb stub's TCP socket
        "mkdir -p /dev/pts /dev/shm",
        "mount -t devpts devpts /dev/pts",
        "mount -t tmpfs tmpfs /dev/shm",
        "ifconfig lo 127.0.0.1 up",
    ]
    if arch is AMD64:  # plugins/pyvmm-kvm/tests/test_kvm_linux.py boots an x86 kernel to its end
        lines.append(f"export PYVMM_LINUX_BOOT=1 PYVMM_LINUX_KERNEL=/{LINUX_DIR}/vmlinuz")
    if arch.guest_qemu:
        lines.append(f"[ -x /usr/bin/{arch.guest_qemu} ] && export PYVMM_TESTBED_QEMU=/usr/bin/{arch.guest_qemu}")
    for module, parameters in arch.kvm_modules:
        path = f"/lib/modules/{kernel_version}/kernel/{module}"
        lines.append(f"insmod {path} {' '.join(parameters)}".rstrip())
    lines += [
        "export HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/opt/testbed",
        # Tests read this to know that the CPU under this KVM is QEMU's emulation.
        f"export {EMULATOR_VARIABLE}=qemu-tcg",
        # Importing a backend (cffi parsing its declarations) takes seconds under
        # emulation, longer than pyvmm's default plugin timeout allows.
        "export PYVMM_PLUGIN_TIMEOUT=120",
        f"export PYVMM_TESTBED_LINUX_KERNEL=/{LINUX_DIR}/vmlinuz PYVMM_TESTBED_LINUX_INITRD=/{LINUX_DIR}/initrd.cpio",
        f"export PYVMM_TESTBED_USERSPACE_MARKER={USERSPACE_MARKER}",
        "cd " + GUEST_CHECKOUT,
        "python3.11 -m testbed.guest /opt/testbed/run.json",
        # The guest program powers off itself; this is for when Python could not start.
        "echo 'testbed: the guest program did not run'; poweroff -f",
    ]
    return "\n".join(lines) + "\n"
