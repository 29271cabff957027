"""The shared run page of a vCPU (KVM's ``kvm_run``, Gunyah's ``gh_vcpu_run``,
GenieZone's ``gzvm_vcpu_run``).

Each of these drivers hands userspace one mmapped page per vCPU holding the exit
and an ``immediate_exit`` byte, and takes the data of an MMIO read back from the
page's ``mmio.data`` on the next run.  :class:`RunPage` owns the mapping and the
views the run loop reuses on every exit, and releases them safely: a view a caller
still holds keeps the mapping alive instead of dangling.
"""

from __future__ import annotations

import mmap


class RunPage:
    """A mapped run page.

    :param mapping: the page(s) mapped from the vCPU fd.
    :param immediate_exit: offset of the ``immediate_exit`` byte.
    :param mmio_data: offset of the 8-byte MMIO data array.
    """

    __slots__ = ("_immediate_exit", "_mapping", "mmio_views", "view")

    def __init__(self, mapping: mmap.mmap, *, immediate_exit: int, mmio_data: int) -> None:
        self._mapping: mmap.mmap | None = mapping
        self._immediate_exit = immediate_exit
        #: The whole page, for ``struct.unpack_from``.
        self.view = memoryview(mapping)
        #: ``mmio_views[n]`` is the first ``n`` bytes of the MMIO data (n = 0..8):
        #: an exit's ``data``, completed in place.
        self.mmio_views = [self.view[mmio_data : mmio_data + n] for n in range(9)]

    def request_immediate_exit(self) -> None:
        """Make the next entry into the guest return at once (any thread)."""
        self.view[self._immediate_exit] = 1

    def clear_immediate_exit(self) -> None:
        self.view[self._immediate_exit] = 0

    @property
    def immediate_exit_requested(self) -> bool:
        return bool(self.view[self._immediate_exit])

    @property
    def closed(self) -> bool:
        return self._mapping is None

    def release(self) -> None:
        """Drop the page's views and unmap it (idempotent).  If a caller still
        holds an exit's ``data`` view, the mapping goes when that view does."""
        if self._mapping is None:
            return
        self.mmio_views.clear()
        self.view.release()
        mapping, self._mapping = self._mapping, None
        try:  # noqa: SIM105 - not contextlib.suppress: this runs for every vCPU closed
            mapping.close()
        except BufferError:
            pass
