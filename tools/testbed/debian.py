"""Debian packages for the guest, through a private apt root in the cache.

apt-get runs with its own state, cache and sources under the bed's cache
directory and with the guest's architecture as its only one, so the host's dpkg
and apt state are never changed (no ``dpkg --add-architecture``) and no root is
needed.  The sources are the host's Debian ones (apt's configuration, proxy
included, is the host's too)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingTool, TestbedError

HOST_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def _debian_sources() -> list[Path]:
    files: list[Path] = []
    for source in HOST_SOURCES:
        candidates = sorted(source.iterdir()) if source.is_dir() else [source]
        for path in candidates:
            if path.suffix not in (".list", ".sources") or not path.is_file():
                continue
            # Only Debian's own archives: a third-party one may not serve this
            # architecture (or be reachable) and would fail the update.
            if "/debian" in path.read_text(errors="replace"):
                files.append(path)
    return files


@dataclass(frozen=True)
class Package:
    name: str
    version: str


class AptRoot:
    """apt-get and apt-cache for one Debian architecture, kept under ``root``."""

    def __init__(self, root: Path, arch: str) -> None:
        self.root = root
        self.arch = arch
        for tool in ("apt-get", "apt-cache", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise MissingTool(f"no {tool}: the test bed builds its guest from Debian packages (a Debian host)")

    def _options(self) -> list[str]:
        r = self.root
        return [
            "-o", f"Dir::State={r / 'state'}",
            "-o", f"Dir::State::status={r / 'status'}",
            "-o", f"Dir::Cache={r / 'cache'}",
            "-o", f"Dir::Etc::SourceList={r / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={r / 'sources.list.d'}",
            "-o", f"APT::Architecture={self.arch}",
            "-o", f"APT::Architectures={self.arch}",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        command = [tool, *self._options(), *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
        if done.returncode != 0:
            raise TestbedError(f"`{tool} {' '.join(args)}` for {self.arch} failed: {done.stderr.strip()[-800:]}")
        return done.stdout

    def update(self, max_age_seconds: float = 24 * 3600) -> None:
        """Fetch the package lists, at most once a day."""
        import time

        stamp = self.root / "updated"
        if stamp.is_file() and time.time() - stamp.stat().st_mtime < max_age_seconds:
            return
        for directory in ("state/lists/partial", "cache/archives/partial", "sources.list.d"):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        (self.root / "sources.list").touch()
        sources = _debian_sources()
        if not sources:
            raise MissingTool("no Debian package sources in /etc/apt: the test bed builds its guest from them")
        for source in sources:
            shutil.copyfile(source, self.root / "sources.list.d" / source.name)
        self._run("apt-get", "update", "-qq")
        stamp.touch()

    def candidates(self, names: list[str]) -> list[Package]:
        """The versions apt would download, as ``apt-cache show`` names them."""
        text = self._run("apt-cache", "show", "--no-all-versions", *names)
        versions: dict[str, str] = {}
        for stanza in text.split("\n\n"):
            name = re.search(r"^Package: (\S+)", stanza, re.MULTILINE)
            version = re.search(r"^Version: (\S+)", stanza, re.MULTILINE)
            if name and version:
                versions.setdefault(name.group(1), version.group(1))
        missing = [name for name in names if name not in versions]
        if missing:
            raise TestbedError(f"Debian has no {', '.join(missing)} for {self.arch}")
        return [Package(name, versions[name]) for name in names]

    def first_dependency(self, name: str) -> str:
        """The first package a meta package depends on (the kernel image behind
        ``linux-image-cloud-arm64``)."""
        text = self._run("apt-cache", "show", "--no-all-versions", name)
        match = re.search(r"^Depends: ([a-z0-9][a-z0-9.+-]*)", text, re.MULTILINE)
        if not match:
            raise TestbedError(f"{name} ({self.arch}) depends on nothing")
        return match.group(1)

    def closure(self, names: tuple[str, ...], leave_out: frozenset[str]) -> list[Package]:
        """``names`` and everything they depend on (Depends and Pre-Depends, every
        alternative), without the packages in ``leave_out`` (tools that only
        package maintainer scripts run)."""
        text = self._run(
            "apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
            "--no-breaks", "--no-replaces", "--no-enhances", *names,
        )  # fmt: skip
        found = sorted({line.strip() for line in text.splitlines() if line and not line.startswith((" ", "<"))})
        return self.candidates([name for name in found if name not in leave_out])

    def download(self, packages: list[Package], into: Path) -> list[Path]:
        into.mkdir(parents=True, exist_ok=True)
        missing = [
            f"{p.name}={p.version}" for p in packages if not list(into.glob(f"{p.name}_{_file_version(p)}_*.deb"))
        ]
        if missing:
            self._run("apt-get", "download", "-qq", *missing, cwd=into)
        debs = []
        for package in packages:
            found = [into / f"{package.name}_{_file_version(package)}_{arch}.deb" for arch in (self.arch, "all")]
            found = [path for path in found if path.is_file()]
            if not found:
                raise TestbedError(f"apt-get download left no .deb of {package.name} in {into}")
            debs.append(found[0])
        return debs


def _file_version(package: Package) -> str:
    """The version as apt writes it in a .deb's file name (an epoch's colon is %3a)."""
    return package.version.replace(":", "%3a")


def extract(deb: Path, into: Path) -> None:
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TestbedError(f"dpkg-deb -x {deb.name} failed: {done.stderr.strip()}")


def versions_key(packages: list[Package]) -> str:
    """A short hash of the exact package versions: the cache key of an image."""
    text = "\n".join(f"{p.name}={p.version}" for p in sorted(packages, key=lambda p: p.name))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
