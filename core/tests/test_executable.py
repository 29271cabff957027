"""The ``pyvmm`` executable's own start-up and exit (:mod:`pyvmm.executable`):
each case runs in a fresh interpreter, as the executable does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from pyvmm.executable import STATUS_BROKEN_PIPE


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )


def test_finish_runs_the_atexit_handlers_flushes_and_exits_with_the_status() -> None:
    done = run_python(
        """
        import atexit, sys
        from pyvmm.executable import finish
        atexit.register(lambda: print("handler ran"))
        sys.stdout.write("unflushed line\\n")
        finish(3)
        print("after finish")
        """
    )
    assert done.returncode == 3
    assert done.stdout.splitlines() == ["unflushed line", "handler ran"]


def test_finish_leaves_a_running_thread_to_pythons_exit_which_joins_it() -> None:
    done = run_python(
        """
        import threading, time
        from pyvmm.executable import finish
        def late():
            time.sleep(0.3)
            print("thread finished", flush=True)
        threading.Thread(target=late).start()
        finish(4)
        """
    )
    assert done.returncode == 4
    assert "thread finished" in done.stdout


def test_collection_is_paused_until_resumed_and_then_leaves_start_up_objects_alone() -> None:
    done = run_python(
        """
        import gc
        from pyvmm import executable
        executable.pause_collection()
        print(gc.isenabled())
        start_up = [[] for _ in range(1000)]
        executable.resume_collection()
        print(gc.isenabled(), gc.get_freeze_count() >= 1000)
        executable.resume_collection()
        print(gc.isenabled())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True", "True"]


def test_resume_does_nothing_where_collection_was_not_paused_by_pyvmm() -> None:
    done = run_python(
        """
        import gc
        from pyvmm import executable
        gc.disable()
        executable.pause_collection()
        executable.resume_collection()
        print(gc.isenabled(), gc.get_freeze_count())
        """
    )
    assert done.stdout.split() == ["False", "0"]


def test_a_reader_that_goes_away_gets_no_traceback_and_the_sigpipe_status() -> None:
    # ``pyvmm backends | true``: the pipe's reader is closed before a word is written.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pyvmm", "backends"],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)
    assert done.returncode == STATUS_BROKEN_PIPE
    assert "Traceback" not in done.stderr
    assert "BrokenPipeError" not in done.stderr
