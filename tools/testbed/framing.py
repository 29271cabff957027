"""The guest's result, framed on the serial console.

Why the console: it is the one channel both beds have without extra drivers
(the cloud kernels' virtio-9p and virtio-blk are modules, arm64's ``virt`` board has
one PL011), it works before anything else in the guest does, and the host already
reads it for the boot log.  Kernel messages may interleave with it, so the
payload is base64 in short lines between marker lines, with its SHA-256, and
the guest lowers the console log level before sending it: a frame that arrives
damaged is reported as damaged, never half-read.

This module runs in the guest too (Python 3.11, the standard library only)."""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from typing import Any

BEGIN = "@@PYVMM-TESTBED-RESULT-BEGIN@@"
END = "@@PYVMM-TESTBED-RESULT-END@@"
LINE = 76


class FrameError(ValueError):
    """No complete, intact result frame on the console."""


def encode(payload: dict[str, Any]) -> str:
    packed = base64.b64encode(zlib.compress(json.dumps(payload).encode(), 9)).decode()
    digest = hashlib.sha256(packed.encode()).hexdigest()
    lines = [packed[i : i + LINE] for i in range(0, len(packed), LINE)]
    return "\n".join([f"{BEGIN} {digest}", *lines, END]) + "\n"


def decode(console: str) -> dict[str, Any]:
    """The last result frame in ``console``'s text."""
    start = console.rfind(BEGIN)
    if start < 0:
        raise FrameError("the guest sent no result")
    end = console.find(END, start)
    if end < 0:
        raise FrameError("the guest's result was cut off (no end marker)")
    header, _, body = console[start:end].partition("\n")
    digest = header[len(BEGIN) :].strip()
    packed = "".join(line.strip() for line in body.splitlines())
    if hashlib.sha256(packed.encode()).hexdigest() != digest:
        raise FrameError("the guest's result arrived damaged (checksum mismatch)")
    loaded = json.loads(zlib.decompress(base64.b64decode(packed)))
    if not isinstance(loaded, dict):
        raise FrameError("the guest's result is not a JSON object")
    return loaded
