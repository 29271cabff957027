"""The guest's initramfs: a cached base of Debian packages and PyPI wheels, a
cached layer of the checkout's wheels, and a small layer of this run's own files
(the tests, the bed's guest code, its settings), concatenated into one archive.

The base is keyed on the exact Debian package versions and on the requirements
of the checkout's wheels (with the target platform), the checkout layer on the
bytes of every file its wheels are built from: a checkout that changes rebuilds
only its own layer."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import cpio, debian, guest_init, wheels
from .arches import Arch
from .errors import TestbedError
from .guest_init import GUEST_CHECKOUT, LINUX_DIR, USERSPACE_MARKER

#: Debian's Python 3.11 without its optional extension modules' libraries
#: (ncurses, readline, sqlite, gdbm, tk), plus busybox for /init and the tools.
GUEST_PACKAGES = (
    "libc6",
    "libgcc-s1",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libssl3",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libcrypt1",
    "busybox-static",
)
#: Parts of the packages the guest never reads: left out to keep the image small.
TRIMMED = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian", "usr/lib/python3.11/idlelib",
           "usr/lib/python3.11/tkinter", "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/ensurepip",
           "usr/lib/python3.11/pydoc_data")  # fmt: skip
#: Packages QEMU depends on that only maintainer scripts use: left out of the anchor.
NOT_FOR_QEMU = frozenset({
    "adduser", "cdebconf", "debconf", "dpkg", "install-info", "passwd", "tar", "libdebian-installer4",
    "libnewt0.52", "libslang2", "libtextwrap1", "iso-codes", "readline-common", "libpam-modules",
    "libpam-modules-bin", "libpam0g", "libsemanage-common", "libsemanage2", "libsepol2", "libaudit-common",
    "libaudit1", "libcap2-bin",
})  # fmt: skip
TESTBED_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BaseImage:
    archive: Path
    kernel: Path
    kernel_version: str
    key: str


def _builder_key() -> str:
    """A hash of the code that lays out the base image: a change to it rebuilds."""
    digest = hashlib.sha256()
    for module in ("image.py", "cpio.py", "wheels.py"):
        digest.update((TESTBED_PACKAGE / module).read_bytes())
    return digest.hexdigest()[:8]


def _cache(cache_dir: Path, arch: Arch) -> Path:
    path = cache_dir / arch.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_base(
    arch: Arch, cache_dir: Path, checkout_wheels: list[Path], say: Callable[[str], None] = print
) -> BaseImage:
    """The base archive and the kernel, from the cache when their key matches."""
    cache = _cache(cache_dir, arch)
    apt = debian.AptRoot(cache / "apt", arch.name)
    apt.update()
    kernel_image = apt.first_dependency(arch.kernel_package)
    packages = apt.candidates([*GUEST_PACKAGES, kernel_image])
    deps_key = wheels.dependencies_key(checkout_wheels, arch.wheel_platforms)
    key = f"{debian.versions_key(packages)}-{deps_key}-{_builder_key()}"
    done = cache / f"base-{key}"
    kernel_version = kernel_image.removeprefix("linux-image-")
    if (done / "base.cpio").is_file() and (done / "vmlinuz").is_file():  # written last, by one rename
        return BaseImage(done / "base.cpio", done / "vmlinuz", kernel_version, key)
    say(f"testbed: building the {arch.name} base image {key} (Debian packages and PyPI wheels)")
    debs = apt.download(packages, cache / "debs")
    wheel_dir = cache / f"wheels-{deps_key}"
    dependency_wheels = wheels.download_dependencies(checkout_wheels, arch.wheel_platforms, wheel_dir)
    with tempfile.TemporaryDirectory(prefix="pyvmm-testbed-", dir=cache) as scratch:
        root = Path(scratch) / "root"
        kernel_root = Path(scratch) / "kernel"
        for deb in debs[:-1]:
            debian.extract(deb, root)
        debian.extract(debs[-1], kernel_root)
        for trimmed in TRIMMED:
            shutil.rmtree(root / trimmed, ignore_errors=True)
        for wheel in dependency_wheels:
            wheels.unpack(wheel, root)
        modules = Path("lib/modules") / kernel_version / "kernel"
        for module, _ in arch.kvm_modules:
            target = root / modules / module
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kernel_root / modules / module, target)
        if not (root / "bin/busybox").is_file():
            raise TestbedError("busybox-static did not provide /bin/busybox")
        linux = root / LINUX_DIR
        linux.mkdir(parents=True)
        shutil.copyfile(kernel_root / "boot" / f"vmlinuz-{kernel_version}", linux / "vmlinuz")
        _userspace_initrd(root / "bin/busybox", linux / "initrd.cpio", Path(scratch) / "userspace")
        stage = Path(scratch) / "done"
        stage.mkdir()
        cpio.archive(root, stage / "base.cpio")
        shutil.copyfile(kernel_root / "boot" / f"vmlinuz-{kernel_version}", stage / "vmlinuz")
        stage.replace(done)
    return BaseImage(done / "base.cpio", done / "vmlinuz", kernel_version, key)


def _userspace_initrd(busybox: Path, target: Path, scratch: Path) -> None:
    """A busybox initramfs whose /init prints the marker with the online CPU count
    and powers off: Linux reached userspace on every CPU it brought up."""
    (scratch / "bin").mkdir(parents=True)
    for directory in ("proc", "sys", "dev"):
        (scratch / directory).mkdir()
    shutil.copyfile(busybox, scratch / "bin/busybox")
    (scratch / "bin/busybox").chmod(0o755)
    init = scratch / "init"
    init.write_text(
        "#!/bin/busybox sh\n"
        "/bin/busybox mount -t proc proc /proc\n"
        "/bin/busybox mount -t sysfs sysfs /sys\n"
        f'echo "{USERSPACE_MARKER} cpus=$(/bin/busybox nproc)"\n'
        "/bin/busybox poweroff -f\n"
    )
    init.chmod(0o755)
    cpio.archive(scratch, target)


def build_anchor(arch: Arch, cache_dir: Path, say: Callable[[str], None] = print) -> Path | None:
    """The archive of QEMU (and what it links) for the guest, cached on its
    packages' versions; None for a bed without one."""
    if not arch.anchor_packages:
        return None
    cache = _cache(cache_dir, arch)
    apt = debian.AptRoot(cache / "apt", arch.name)
    apt.update()
    packages = apt.closure(arch.anchor_packages, NOT_FOR_QEMU)
    done = cache / f"anchor-{debian.versions_key(packages)}.cpio"
    if done.is_file():
        return done
    say(f"testbed: building the {arch.name} anchor (QEMU inside the guest: {len(packages)} Debian packages)")
    debs = apt.download(packages, cache / "debs")
    with tempfile.TemporaryDirectory(prefix="pyvmm-testbed-", dir=cache) as scratch:
        root = Path(scratch) / "root"
        for deb in debs:
            debian.extract(deb, root)
        for trimmed in TRIMMED:
            shutil.rmtree(root / trimmed, ignore_errors=True)
        cpio.archive(root, done)
    return done


def build_checkout_layer(cache_dir: Path, checkout: Path) -> tuple[Path, list[Path]]:
    """The archive of the checkout's installed wheels and the wheels themselves."""
    key = wheels.checkout_key(checkout)
    done = cache_dir / f"checkout-{key}"
    if not (done / "checkout.cpio").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pyvmm-testbed-", dir=cache_dir) as scratch:
            stage = Path(scratch) / "done"
            built = wheels.build_checkout_wheels(checkout, stage / "wheels")
            root = Path(scratch) / "root"
            for wheel in built:
                wheels.unpack(wheel, root)
            cpio.archive(root, stage / "checkout.cpio")
            stage.replace(done)
    return done / "checkout.cpio", sorted((done / "wheels").glob("*.whl"))


def build_run_layer(
    arch: Arch, base: BaseImage, checkout: Path, *, selection: list[str], settings: Mapping[str, object], into: Path
) -> Path:
    """This run's files: /init, the bed's package, the selected tests and ``run.json``."""
    root = into / "run-root"
    init = root / "init"
    init.parent.mkdir(parents=True)
    init.write_text(guest_init.init_script(arch, base.kernel_version))
    init.chmod(0o755)
    own_code = shutil.ignore_patterns("__pycache__", "tests")  # the host's tests stay on the host
    shutil.copytree(TESTBED_PACKAGE, root / "opt/testbed/testbed", ignore=own_code)
    (root / "opt/testbed/run.json").write_text(json.dumps(settings))
    guest_checkout = root / GUEST_CHECKOUT.lstrip("/")
    guest_checkout.mkdir(parents=True)
    for item in selection:
        relative = item.split("::", 1)[0]
        source = (checkout / relative).resolve()
        if checkout.resolve() not in (source, *source.parents) or not source.exists():
            raise TestbedError(f"the test selection {item!r} is not a path inside the checkout {checkout}")
        target = guest_checkout / source.relative_to(checkout.resolve())
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    archive = into / "run.cpio"
    cpio.archive(root, archive)
    return archive


def concatenate(parts: list[Path], target: Path) -> None:
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)
