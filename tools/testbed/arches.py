"""What differs between the two beds: the emulated machine, the Debian kernel and
architecture, the wheels' platform, and how KVM comes up inside."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class KvmMode:
    """One way the guest's KVM can come up, and the line its dmesg then shows."""

    name: str
    #: Kernel command-line words that select the mode.
    cmdline: tuple[str, ...]
    #: A substring of the dmesg line KVM prints once it runs in this mode.
    dmesg_marker: str


@dataclass(frozen=True)
class Arch:
    name: str  # "arm64" or "amd64", Debian's names
    qemu: str
    qemu_package: str
    #: QEMU options before -kernel: the machine, CPU and accelerator.
    machine_args: tuple[str, ...]
    console: str  # the guest's serial console device
    kernel_package: str  # the meta package; its dependency names the real image
    #: The machine part of the wheels' platform tags (manylinux_2_X_<machine>).
    wheel_machine: str
    #: KVM modules to load in order (path below /lib/modules/<version>/kernel),
    #: each with its parameters; empty where KVM is built in.
    kvm_modules: tuple[tuple[str, tuple[str, ...]], ...]
    modes: tuple[KvmMode, ...]
    #: What the guest's pytest runs by default: test paths in the checkout, then
    #: pytest options (``--pyvmm-backend kvm`` adds the conformance suite itself).
    default_selection: tuple[str, ...]
    default_pytest_args: tuple[str, ...] = ()
    #: Debian packages of the anchor, QEMU with KVM inside the guest (empty: none).
    anchor_packages: tuple[str, ...] = ()
    #: The name of QEMU's binary inside the guest.
    guest_qemu: str = ""

    @property
    def wheel_platforms(self) -> tuple[str, ...]:
        """pip's --platform values: every manylinux that Debian 12's glibc (2.36)
        satisfies (pip does not infer the older ones from the newest)."""
        return tuple(f"manylinux_2_{minor}_{self.wheel_machine}" for minor in range(36, 16, -1))

    def mode(self, name: str | None) -> KvmMode:
        if name is None:
            return self.modes[0]
        for mode in self.modes:
            if mode.name == name:
                return mode
        known = ", ".join(m.name for m in self.modes)
        raise UsageError(f"the {self.name} bed has no KVM mode {name!r}: choose one of {known}")


ARM64 = Arch(
    name="arm64",
    qemu="qemu-system-aarch64",
    qemu_package="qemu-system-arm",
    # virtualization=on: the emulated CPU boots the kernel at EL2, so KVM comes up.
    # neoverse-n1, not the issue's "max,pauth-impdef=on": under QEMU 7.2's -cpu max
    # a VM created after another, on host pages the first one's guest code used,
    # executed the old VM's instructions (reproduced with two VMs in a row; gone
    # with the first VM's memory kept alive, or with neoverse-n1 or cortex-a76).
    # Neoverse-N1 is ARMv8.2 with VHE and no pointer authentication, so it also
    # boots as fast as max with pauth-impdef=on.
    machine_args=(
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        "neoverse-n1",
        "-accel",
        "tcg",
    ),
    console="ttyAMA0",
    kernel_package="linux-image-cloud-arm64",
    wheel_machine="aarch64",
    kvm_modules=(),  # arm64's KVM is built into Debian's kernel
    modes=(
        # Debian's kernel picks VHE when it boots at EL2 on a CPU with VHE (Neoverse-N1 has it).
        KvmMode("vhe", (), "VHE mode initialized successfully"),
        KvmMode("nvhe", ("kvm-arm.mode=nvhe",), "Hyp mode initialized successfully"),
        KvmMode("protected", ("kvm-arm.mode=protected",), "Protected nVHE mode initialized successfully"),
    ),
    # The KVM backend's own tests (the arm64 ones run, the x86 ones skip on an
    # arm64 host with their reason) and the conformance suite, whose x86
    # scenarios skip there too: the arm64 backend declares aarch64 guests only.
    default_selection=("plugins/pyvmm-kvm/tests", "tools/testbed/guest_tests"),
    default_pytest_args=(),
    anchor_packages=("qemu-system-arm",),
    guest_qemu="qemu-system-aarch64",
)

AMD64 = Arch(
    name="amd64",
    qemu="qemu-system-x86_64",
    qemu_package="qemu-system-x86",
    # QEMU's TCG emulates AMD's SVM with nested paging, not Intel's VMX: kvm_amd.
    machine_args=("-M", "q35", "-cpu", "EPYC", "-accel", "tcg"),
    console="ttyS0",
    kernel_package="linux-image-cloud-amd64",
    wheel_machine="x86_64",
    kvm_modules=(
        ("virt/lib/irqbypass.ko", ()),
        ("arch/x86/kvm/kvm.ko", ()),
        # TCG does not emulate next-RIP saving; kvm_amd must not rely on it.
        ("arch/x86/kvm/kvm-amd.ko", ("nrips=0",)),
    ),
    # A periodic tick for the bed's kernel (nohz=off highres=off: the local APIC
    # timer in periodic mode). Under QEMU 7.2's TCG the emulated CPU can lose the
    # request for a pending interrupt while it runs a nested guest: seen with the
    # guest's kernel spinning on a lock held by its other vCPU, whose thread the
    # bed's one CPU then never ran again -- the bed's APIC held the timer vector
    # in IRR, QEMU's CPU state allowed delivery (GIF, HIF, V_INTR_MASKING set),
    # yet its interrupt_request was 0 and the bed froze for good. A one-shot
    # tick is re-armed only by the interrupt that was lost; a periodic one
    # raises the request again at the next tick.
    modes=(KvmMode("amd", ("nohz=off", "highres=off"), "kvm: Nested Paging enabled"),),
    # examples/fuzzing holds no tests: it is there for the KVM test that runs it.
    default_selection=("plugins/pyvmm-kvm/tests", "tools/testbed/guest_tests", "examples/fuzzing"),
    default_pytest_args=(),
    anchor_packages=("qemu-system-x86",),
    guest_qemu="qemu-system-x86_64",
)

ARCHES = {arch.name: arch for arch in (ARM64, AMD64)}


def arch_named(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise UsageError(f"no test bed for {name!r}: choose one of {', '.join(ARCHES)}") from None
