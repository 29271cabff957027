"""Pruning the bed's cache, on a cache made up in a temporary directory."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from testbed import cachelock, cli
from testbed.bed import prune_cache
from testbed.errors import UsageError
from testbed.prune import prune

HOUR = 3600.0
NOW = time.time()


def entry(path: Path, hours_ago: float, size: int = 1000) -> Path:
    """A cache entry last used ``hours_ago``: a directory with a file, or a file."""
    if path.suffix in (".cpio", ".deb"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    else:
        (path / "wheels").mkdir(parents=True)
        (path / "checkout.cpio").write_bytes(b"x" * size)
    stamp = NOW - hours_ago * HOUR
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    for hours, key in enumerate(("a", "b", "c", "d"), start=2):
        entry(root / f"checkout-{key}", hours_ago=hours)  # a is the newest
    entry(root / "amd64/base-new", hours_ago=3)
    entry(root / "amd64/base-mid", hours_ago=5)
    entry(root / "amd64/base-old", hours_ago=9)
    entry(root / "amd64/anchor-x.cpio", hours_ago=30)
    entry(root / "arm64/base-only", hours_ago=40)
    for hours, version in enumerate(("3", "2", "1"), start=2):
        entry(root / f"amd64/debs/libc6_2.36-{version}_amd64.deb", hours_ago=hours)
    entry(root / "amd64/debs/zlib1g_1.2_amd64.deb", hours_ago=50)
    (root / "amd64/apt/state").mkdir(parents=True)
    os.utime(root / "amd64/apt", (NOW - 99 * HOUR, NOW - 99 * HOUR))
    (root / "notes.txt").write_text("not ours to judge")
    return root


def names(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.parent.name in ("cache", "amd64", "arm64", "debs")}


def test_the_newest_per_kind_and_what_the_run_uses_are_kept(cache: Path) -> None:
    report = prune(cache, keep=2, in_use=[cache / "checkout-d", cache / "amd64/base-new"], now=NOW)
    gone = {"checkout-b", "checkout-c", "amd64/base-old", "amd64/debs/libc6_2.36-1_amd64.deb"}
    assert {str(e.path.relative_to(cache)) for e in report.removed} == gone
    assert not gone & names(cache)
    # checkout-d is kept though the oldest (in use, it counts toward the two);
    # each kind keeps its own two (per arch, per Debian package)
    for kept in ("checkout-a", "checkout-d", "amd64/base-new", "amd64/base-mid", "amd64/anchor-x.cpio",
                 "arm64/base-only", "amd64/debs/libc6_2.36-3_amd64.deb", "amd64/debs/libc6_2.36-2_amd64.deb",
                 "amd64/debs/zlib1g_1.2_amd64.deb", "amd64/apt", "notes.txt"):  # fmt: skip
        assert kept in names(cache), kept
    assert report.freed == 4000  # three 1000-byte layers and one .deb
    assert report.refused == []


def test_keep_zero_removes_all_but_recent_and_in_use(cache: Path) -> None:
    entry(cache / "checkout-fresh", hours_ago=0.1)
    prune(cache, keep=0, in_use=[cache / "amd64/base-mid"], now=NOW)
    left = names(cache)
    assert {n for n in left if n.startswith(("checkout-", "amd64/base", "amd64/anchor", "arm64/"))} == {
        "checkout-fresh",  # used within the last hour: maybe by a run of an older, lock-less tool
        "amd64/base-mid",
    }
    assert {"amd64/apt", "notes.txt"} <= left


def test_a_dry_run_removes_nothing_and_says_what_would_go(cache: Path) -> None:
    before = {p: p.lstat().st_mtime for p in cache.rglob("*")}
    report = prune(cache, keep=1, dry_run=True, now=NOW)
    assert {p: p.lstat().st_mtime for p in cache.rglob("*")} == before
    assert len(report.removed) == 7
    lines = report.lines()
    assert lines[0].startswith("testbed: cache: would remove ") and lines[0].endswith("(1000 B, amd64/base)")
    assert lines[-1].startswith("testbed: cache: would remove 7 entries, 6.8 KiB")


def test_links_leaving_the_cache_are_refused_not_followed(cache: Path, tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    (outside / "debs").mkdir(parents=True)
    (outside / "debs/keep_1_amd64.deb").write_text("mine")
    (outside / "checkout.cpio").write_text("mine")
    for hours in (10, 11):
        (cache / f"checkout-link{hours}").symlink_to(outside)
        os.utime(cache / f"checkout-link{hours}", (NOW - hours * HOUR,) * 2, follow_symlinks=False)
    (cache / "arm64/debs").symlink_to(outside / "debs")
    (cache / "checkout-c/escape").symlink_to(outside)  # inside an entry that goes: the link goes, not its target
    os.utime(cache / "checkout-c", (NOW - 4 * HOUR,) * 2)
    report = prune(cache, keep=0, now=NOW)
    refused = {str(path.relative_to(cache)): why for path, why in report.refused}
    assert set(refused) == {"checkout-link10", "checkout-link11", "arm64/debs"}
    assert all("symbolic link" in why for why in refused.values())
    assert (outside / "checkout.cpio").read_text() == "mine"
    assert (outside / "debs/keep_1_amd64.deb").read_text() == "mine"
    assert not (cache / "checkout-c").exists()
    assert any("refused" in line for line in report.lines())


def test_a_cache_reached_through_a_link_is_pruned_in_place(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "via").symlink_to(cache)  # ~/.cache itself may be a link: the resolved root is the cache
    report = prune(tmp_path / "via", keep=2, now=NOW)
    assert len(report.removed) == 4 and report.refused == []


def test_scratch_left_by_a_killed_run_goes_once_old(cache: Path) -> None:
    entry(cache / "pyvmm-testbed-old", hours_ago=5)
    entry(cache / "amd64/pyvmm-testbed-busy", hours_ago=0)
    prune(cache, keep=2, now=NOW)
    assert not (cache / "pyvmm-testbed-old").exists()
    assert (cache / "amd64/pyvmm-testbed-busy").exists()


def test_nothing_is_pruned_while_a_bed_run_holds_the_cache(cache: Path) -> None:
    said: list[str] = []
    with cachelock.shared(cache):
        assert not prune_cache(cache, keep=0, in_use=[], log=said.append)
    assert said == [f"testbed: cache: another bed run is using {cache}; nothing pruned"]
    assert (cache / "checkout-d").exists()
    assert prune_cache(cache, keep=0, in_use=[], log=said.append)  # released: the lock went with the run
    assert not (cache / "checkout-d").exists()


def test_the_prune_command(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["prune", "--cache-dir", str(cache), "--keep", "1", "--dry-run"]) == 0
    assert "would remove 7 entries" in capsys.readouterr().out
    assert (cache / "checkout-d").exists()
    assert cli.main(["prune", "--cache-dir", str(cache), "--keep", "-1"]) == 2
    assert "--keep must be 0 or more" in capsys.readouterr().err
    assert cli.main(["prune", "--cache-dir", str(cache)]) == 0
    assert "removed 4 entries" in capsys.readouterr().out
    with pytest.raises(UsageError):
        prune(cache, keep=-1)


def test_a_bed_run_marks_what_it_used_and_prunes_the_rest_after_qemu(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_bed with the builders and QEMU faked: the entries it used are kept
    (their time set to now), older ones of their kinds go, and the cache is
    locked while QEMU runs, so a prune then would have removed nothing."""
    from testbed import bed, image, qemu
    from testbed.arches import AMD64
    from testbed.framing import encode

    checkout_dir = cache / "checkout-d"  # the oldest checkout and base: only their use keeps them
    base = image.BaseImage(cache / "amd64/base-old/base.cpio", cache / "amd64/base-old/vmlinuz", "6.1", "old")
    base.archive.write_bytes(b"")
    os.utime(base.archive.parent, (NOW - 9 * HOUR,) * 2)
    locked_during_boot: list[bool] = []

    def boot(argv: list[str], timeout: float, echo: object = None) -> qemu.Boot:
        with cachelock.exclusive(cache) as alone:
            locked_during_boot.append(not alone)
        return qemu.Boot(encode({"exit_status": 0, "junit": None}), 0, 1.0)

    monkeypatch.setattr(qemu, "qemu_binary", lambda arch: "qemu")
    monkeypatch.setattr(image, "build_checkout_layer", lambda c, k: (checkout_dir / "checkout.cpio", []))
    monkeypatch.setattr(image, "build_base", lambda *args: base)
    monkeypatch.setattr(image, "build_anchor", lambda *args: cache / "amd64/anchor-x.cpio")
    monkeypatch.setattr(qemu, "boot", boot)
    said: list[str] = []
    result = bed.run_bed(AMD64, None, [], [], cache_dir=cache, checkout=tmp_path, log=said.append)
    assert result.ok and locked_during_boot == [True]
    left = names(cache)
    assert {"checkout-d", "checkout-a", "amd64/base-old", "amd64/base-new", "amd64/anchor-x.cpio"} <= left
    assert not {"checkout-b", "checkout-c", "amd64/base-mid"} & left
    assert NOW - (cache / "checkout-d").stat().st_mtime < 60
    assert any(line.startswith("testbed: cache: removed 4 entries") for line in said)
