"""What only the ``pyvmm`` executable does, never a caller of :func:`pyvmm.cli.main`
inside a process that goes on (a test, a VMM embedding pyvmm).

Two costs of a short command are Python's, not the command's (issue 19: the
whole ``pyvmm run`` of the demo should cost at most 9 ``python -c pass``):

* **collections during start-up.**  Importing the machine, the backend and
  pluggy creates tens of thousands of objects that all live to the end; the
  cyclic collector runs dozens of times over them while they are made.  It is
  paused from the start (:func:`pause_collection`) and resumed, with
  everything made so far frozen out of its way, as the guest starts
  (:func:`resume_collection`) — which also spares a long run's collections
  from walking those objects again.
* **teardown.**  At exit Python frees every module and object one by one.
  :func:`finish` flushes the standard streams, runs the ``atexit`` handlers
  (a raw terminal is put back there) and ends the process with ``os._exit``,
  unless a thread that is not a daemon still runs (then Python's own exit
  joins it, as it always would).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from typing import NoReturn

#: ``pyvmm backends | head``: the reader went away; the status a shell gives a
#: command killed by SIGPIPE (128 + 13), without a traceback.
STATUS_BROKEN_PIPE = 141

_paused = False


def pause_collection() -> None:
    """Pause the cyclic garbage collector for the start-up of this process."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_collection() -> None:
    """Start-up is over (the guest is about to run): collect again, leaving
    out every object made so far (``gc.freeze``: they live to the end).
    A no-op unless :func:`pause_collection` paused it."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()


def finish(status: int) -> NoReturn:
    """End the process with ``status`` once output is out and the ``atexit``
    handlers ran, without Python's teardown."""
    status = _flush(status)
    if any(
        thread.is_alive() and not thread.daemon
        for thread in threading.enumerate()
        if thread is not threading.main_thread()
    ):
        sys.exit(status)
    atexit._run_exitfuncs()
    status = _flush(status)
    os._exit(status)


def quiet_broken_pipe() -> int:
    """The standard output's reader is gone: point it at /dev/null so nothing
    tries to write there again, and give the status for it."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, sys.stdout.fileno())
    finally:
        os.close(null)
    return STATUS_BROKEN_PIPE


def _flush(status: int) -> int:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = quiet_broken_pipe()
    except (OSError, ValueError):
        pass  # a closed or unwritable stdout: nothing more can be said there
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    return status
