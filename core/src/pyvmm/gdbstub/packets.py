"""GDB remote serial protocol framing: ``$data#cs`` packets, acks, escapes.

A packet is ``$`` + data + ``#`` + two hex digits, the sum of the data bytes
modulo 256.  In data, ``#``, ``$``, ``}`` and ``*`` are escaped as ``}`` followed
by the byte XOR 0x20 (gdb escapes only what it must; ``*`` starts run-length
encoding, which pyvmm never sends and decodes where gdb sends it).  The receiver
answers ``+`` (or ``-`` for a bad checksum) until ``QStartNoAckMode``.  A lone
0x03 byte outside a packet is gdb's interrupt (Ctrl-C).
"""

from __future__ import annotations

INTERRUPT = 0x03
#: The largest packet pyvmm accepts (it says PacketSize=4000 in qSupported,
#: which is hex for 16 KiB of data).
MAX_PACKET = 0x4000


class ProtocolError(Exception):
    """The peer sent something that is not the remote protocol."""


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in b"#$}*":
            out += bytes((0x7D, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def frame(data: bytes) -> bytes:
    """``data`` as one packet, escaped."""
    body = escape(data)
    return b"$" + body + b"#" + b"%02x" % checksum(body)


def unescape(body: bytes) -> bytes:
    """Undo escapes and run-length encoding in a received packet's data."""
    out = bytearray()
    i = 0
    while i < len(body):
        byte = body[i]
        if byte == 0x7D and i + 1 < len(body):
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif byte == 0x2A and out and i + 1 < len(body):  # '*': repeat the previous byte
            out += bytes((out[-1],)) * (body[i + 1] - 29)
            i += 2
        else:
            out.append(byte)
            i += 1
    return bytes(out)


class PacketReader:
    """Turns a byte stream into events: ``("packet", data)``, ``("interrupt", b"")``,
    ``("ack", b"+")``/``("nak", b"-")``, and ``("bad", data)`` for a packet whose
    checksum did not match."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self._buffer += data
        events: list[tuple[str, bytes]] = []
        buf = self._buffer
        while buf:
            first = buf[0]
            if first == INTERRUPT:
                events.append(("interrupt", b""))
                del buf[:1]
            elif first == ord("+"):
                events.append(("ack", b"+"))
                del buf[:1]
            elif first == ord("-"):
                events.append(("nak", b"-"))
                del buf[:1]
            elif first == ord("$"):
                end = buf.find(b"#")
                if end < 0:
                    if len(buf) > MAX_PACKET * 2 + 4:
                        raise ProtocolError("a packet longer than the stub's PacketSize")
                    break
                if len(buf) < end + 3:
                    break
                body = bytes(buf[1:end])
                sent = bytes(buf[end + 1 : end + 3])
                del buf[: end + 3]
                try:
                    ok = int(sent, 16) == checksum(body)
                except ValueError:
                    ok = False
                events.append(("packet", unescape(body)) if ok else ("bad", body))
            else:
                del buf[:1]  # noise between packets
        return events
