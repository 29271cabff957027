"""Where the gdb stub listens: ``tcp:HOST:PORT`` as QEMU's ``-gdb`` takes it."""

from __future__ import annotations

__all__ = ["parse_gdb_address"]


def parse_gdb_address(text: str) -> tuple[str, int]:
    """``tcp:HOST:PORT``, ``tcp::PORT``, ``tcp:PORT``, ``HOST:PORT``, ``:PORT`` or
    ``PORT`` -> (host, port); the host defaults to localhost.

    :raises ValueError: a message saying what is wrong.
    """
    rest = text.strip()
    if rest.startswith("tcp:"):
        rest = rest[4:]
    elif "://" in rest or rest.startswith(("unix:", "udp:")):
        raise ValueError(f"{text!r} is not tcp:HOST:PORT (e.g. tcp::1234 or tcp:localhost:1234)")
    host, _, port_text = rest.rpartition(":")
    host = host.strip("[]") or "localhost"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: the port must be a number (tcp:HOST:PORT, e.g. tcp::1234)") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range (0..65535; 0 picks a free one)")
    return host, port
