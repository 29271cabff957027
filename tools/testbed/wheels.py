"""Python distributions for the guest: the checkout's own, built on the host as
wheels (pure Python; cffi in ABI mode, so nothing is compiled for the guest),
and their dependencies from PyPI as wheels for the guest's platform.  The guest
never runs pip: wheels are unpacked on the host into the image's
``dist-packages``, ``.dist-info`` included, so entry points (pyvmm's backends,
pytest's plugin) are found in the guest as after an install."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import TestbedError

#: The checkout's distributions the guest runs, relative to the checkout.
CHECKOUT_PROJECTS = ("core", "plugins/pyvmm-kvm")
#: What the guest needs beyond their own dependencies.
EXTRA_REQUIREMENTS = ("pytest>=8",)
GUEST_PYTHON = "3.11"  # Debian 12's
#: Where Debian's python3.11 looks for installed distributions.
SITE = Path("usr/lib/python3/dist-packages")


def _source_files(project: Path) -> list[Path]:
    skipped = {"build", "__pycache__", ".pytest_cache"}
    files = []
    for path in sorted(project.rglob("*")):
        parts = set(path.relative_to(project).parts)
        if path.is_file() and not parts & skipped and not any(p.endswith(".egg-info") for p in parts):
            files.append(path)
    return files


def checkout_key(checkout: Path) -> str:
    """A hash of every file the checkout's wheels are built from."""
    digest = hashlib.sha256()
    for name in CHECKOUT_PROJECTS:
        project = checkout / name
        for path in _source_files(project):
            digest.update(str(path.relative_to(checkout)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_checkout_wheels(checkout: Path, into: Path) -> list[Path]:
    """``pip wheel --no-deps`` of each checkout project, into ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    for name in CHECKOUT_PROJECTS:
        project = checkout / name
        command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(into), str(project)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        # setuptools leaves build/ beside the sources and would reuse it next time.
        shutil.rmtree(project / "build", ignore_errors=True)
        if done.returncode != 0:
            raise TestbedError(f"building the wheel of {name} failed: {done.stderr.strip()[-800:]}")
    return sorted(into.glob("*.whl"))


def requirements_of(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's metadata."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def dependencies_key(checkout_wheels: list[Path], platforms: tuple[str, ...]) -> str:
    lines = sorted({r for w in checkout_wheels for r in requirements_of(w)} | set(EXTRA_REQUIREMENTS))
    text = "\n".join([*platforms, GUEST_PYTHON, *lines])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def download_dependencies(checkout_wheels: list[Path], platforms: tuple[str, ...], into: Path) -> list[Path]:
    """The dependencies of the checkout's wheels (and pytest) as binary wheels for
    CPython 3.11 on ``platforms``, resolved by pip against the wheels' metadata."""
    into.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "-q", "--dest", str(into),
        "--only-binary=:all:", *(f"--platform={p}" for p in platforms), "--python-version", GUEST_PYTHON,
        "--implementation", "cp", "--abi", "cp" + GUEST_PYTHON.replace(".", ""),
        *(str(w) for w in checkout_wheels), *EXTRA_REQUIREMENTS,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        why = done.stderr.strip()[-800:]
        raise TestbedError(f"pip could not download the guest's wheels for {platforms[0]}: {why}")
    own = {w.name for w in checkout_wheels}
    return sorted(w for w in into.glob("*.whl") if w.name not in own)


def unpack(wheel: Path, root: Path) -> None:
    """Install ``wheel`` below ``root`` as pip would into ``SITE`` (its scripts
    and data files are left out: the guest runs ``python3 -m``)."""
    site = root / SITE
    site.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            parts = Path(member.filename).parts
            if not parts or member.is_dir() or ".." in parts:
                continue
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = site.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
            if member.external_attr >> 16 & 0o111:
                target.chmod(0o755)
