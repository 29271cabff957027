"""ioctl request numbers, encoded as each host OS encodes them, with their names.

Three encodings cover every pyvmm backend:

* **Linux asm-generic** (``include/uapi/asm-generic/ioctl.h``, used by x86 and
  arm64): ``dir << 30 | size << 16 | type << 8 | nr``, with ``dir`` 0 (none),
  1 (write: userspace to kernel) or 2 (read), and a 14-bit size.  KVM, Gunyah,
  GenieZone and HAXM on Linux.
* **BSD / macOS** (``sys/ioccom.h``): ``inout | (size & 0x1fff) << 16 | group << 8
  | num``, with ``IOC_VOID`` 0x20000000, ``IOC_OUT`` 0x40000000 (kernel to
  userspace) and ``IOC_IN`` 0x80000000.  HAXM on macOS.
* **Windows** ``CTL_CODE`` (``winioctl.h``): ``device_type << 16 | access << 14 |
  function << 2 | method``, for ``DeviceIoControl``.  HAXM on Windows.

Each encoder returns an :class:`IoctlRequest`, an ``int`` in every way (pass it
straight to ``ioctl``); :func:`request_names` then collects the names of a bindings
module's requests from the names they were assigned to, so no bindings module keeps
a hand-written table that can drift from its constants::

    KVM_RUN = linux.io(KVMIO, 0x80)
    IOCTL_NAMES = request_names(globals())   # {0xae80: "KVM_RUN", ...}
"""

from __future__ import annotations

from collections.abc import Mapping


class IoctlRequest(int):
    """An encoded ioctl request number.  Only its type differs from ``int``: it
    marks the value as a request for :func:`request_names`."""

    __slots__ = ()


def _checked(value: int, bits: int, what: str) -> int:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"ioctl {what} {value:#x} does not fit in {bits} bits")
    return value


class _LinuxEncoding:
    """``_IO``/``_IOR``/``_IOW``/``_IOWR`` of ``asm-generic/ioctl.h``."""

    NONE = 0
    WRITE = 1
    READ = 2

    def ioc(self, direction: int, kind: int, nr: int, size: int) -> IoctlRequest:
        return IoctlRequest(
            _checked(direction, 2, "direction") << 30
            | _checked(size, 14, "argument size") << 16
            | _checked(kind, 8, "type") << 8
            | _checked(nr, 8, "number")
        )

    def io(self, kind: int, nr: int) -> IoctlRequest:
        return self.ioc(self.NONE, kind, nr, 0)

    def ior(self, kind: int, nr: int, size: int) -> IoctlRequest:
        return self.ioc(self.READ, kind, nr, size)

    def iow(self, kind: int, nr: int, size: int) -> IoctlRequest:
        return self.ioc(self.WRITE, kind, nr, size)

    def iowr(self, kind: int, nr: int, size: int) -> IoctlRequest:
        return self.ioc(self.READ | self.WRITE, kind, nr, size)


class _BsdEncoding:
    """``_IO``/``_IOR``/``_IOW``/``_IOWR`` of BSD's and macOS's ``sys/ioccom.h``."""

    VOID = 0x20000000
    OUT = 0x40000000
    IN = 0x80000000
    PARM_MASK = 0x1FFF

    def ioc(self, inout: int, group: int, num: int, size: int) -> IoctlRequest:
        if size & ~self.PARM_MASK:
            raise ValueError(f"ioctl argument size {size:#x} does not fit in 13 bits")
        return IoctlRequest(inout | size << 16 | _checked(group, 8, "group") << 8 | _checked(num, 8, "number"))

    def io(self, group: int, num: int) -> IoctlRequest:
        return self.ioc(self.VOID, group, num, 0)

    def ior(self, group: int, num: int, size: int) -> IoctlRequest:
        return self.ioc(self.OUT, group, num, size)

    def iow(self, group: int, num: int, size: int) -> IoctlRequest:
        return self.ioc(self.IN, group, num, size)

    def iowr(self, group: int, num: int, size: int) -> IoctlRequest:
        return self.ioc(self.IN | self.OUT, group, num, size)


#: Linux (asm-generic: x86, arm64).
linux = _LinuxEncoding()
#: BSD and macOS.
bsd = _BsdEncoding()

# winioctl.h transfer methods and access rights.
METHOD_BUFFERED = 0
METHOD_IN_DIRECT = 1
METHOD_OUT_DIRECT = 2
METHOD_NEITHER = 3
FILE_ANY_ACCESS = 0
FILE_READ_ACCESS = 1
FILE_WRITE_ACCESS = 2


def ctl_code(
    device_type: int, function: int, method: int = METHOD_BUFFERED, access: int = FILE_ANY_ACCESS
) -> IoctlRequest:
    """Windows ``CTL_CODE``: a ``DeviceIoControl`` code."""
    return IoctlRequest(
        _checked(device_type, 16, "device type") << 16
        | _checked(access, 2, "access") << 14
        | _checked(function, 12, "function") << 2
        | _checked(method, 2, "method")
    )


def request_names(namespace: Mapping[str, object]) -> dict[int, str]:
    """``{request: name}`` for every :class:`IoctlRequest` in ``namespace`` (a
    bindings module's ``globals()``), named by the variable it was assigned to.

    :raises ValueError: two names share one number, which would make error
        messages name the wrong call.
    """
    names: dict[int, str] = {}
    for name, value in namespace.items():
        if isinstance(value, IoctlRequest) and not name.startswith("_"):
            other = names.get(int(value))
            if other is not None and other != name:
                raise ValueError(f"ioctl requests {other} and {name} share the number {int(value):#x}")
            names[int(value)] = name
    return names
