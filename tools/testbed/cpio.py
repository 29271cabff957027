"""Writes a directory tree as a ``newc`` cpio archive, the format Linux unpacks
as its initramfs.  Owners are root and times zero, so the same tree gives the
same bytes.  Archives may be concatenated: the kernel unpacks each in turn, a
later one adding to (and overriding) the files of an earlier one, which is how
a run's own files are laid over the cached image."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _entry(out: BinaryIO, name: str, mode: int, data: bytes, inode: int) -> None:
    encoded = name.encode() + b"\0"
    fields = (inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = MAGIC + b"".join(b"%08X" % value for value in fields)
    out.write(header + encoded + _pad(len(header) + len(encoded)))
    out.write(data + _pad(len(data)))


def write_tree(root: Path, out: BinaryIO) -> int:
    """Archive everything below ``root`` (named relative to it); returns the
    number of entries.  Parents come before their children."""
    inode = 0
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in [*sorted(subdirs), *sorted(files)]:
            path = Path(directory) / name
            info = path.lstat()
            relative = str(path.relative_to(root))
            inode += 1
            if stat.S_ISLNK(info.st_mode):
                data = os.readlink(path).encode()
            elif stat.S_ISREG(info.st_mode):
                data = path.read_bytes()
            elif stat.S_ISDIR(info.st_mode):
                data = b""
            else:
                continue  # devices and fifos: devtmpfs provides /dev in the guest
            _entry(out, relative, info.st_mode, data, inode)
    _entry(out, TRAILER, 0, b"", 0)
    return inode


def archive(root: Path, target: Path) -> None:
    """Write ``target`` atomically (a crash leaves no half archive in the cache)."""
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as out:
        write_tree(root, out)
    partial.replace(target)
