"""Waking a vCPU thread that sits in a hypervisor call, for backends' kicks.

Setting a run page's ``immediate_exit`` only stops the *next* entry into the
guest; a thread already inside the hypervisor (a guest spinning, a vCPU waiting
in WFI/HLT) leaves only when a signal is pending for it.  The signal needs a
handler, since the default action of a real-time signal kills the process, and
Python installs handlers only from the main thread: backends call
:func:`install_kick_handler` when a VM is created, and :func:`require_kick_handler`
before signalling.
"""

from __future__ import annotations

import signal
import threading

from pyvmm.errors import VmStateError

#: The signal a kick sends to the vCPU thread.
KICK_SIGNAL = signal.SIGRTMIN
_installed = False


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick only needs the blocked call to see a pending signal."""


def install_kick_handler() -> bool:
    """Install the kick signal's handler if possible; True once one is in place."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _ignore_kick)
    _installed = True
    return True


def require_kick_handler(backend: str) -> None:
    """Raise unless a kick signal can be delivered without killing the process."""
    if not _installed:
        raise VmStateError(
            f"cannot interrupt a running {backend} vCPU: the kick signal handler could not be installed "
            "(create the VM from the main thread, or call pyvmm.kick_signal.install_kick_handler() there)"
        )
