"""The optional compiled exit path (``pyvmm_kvm._fast_exits``, cffi API mode).

Everything else about the distribution is in ``pyproject.toml``.  The module is
built where a C compiler and the kernel's ``<linux/kvm.h>`` exist; anywhere else
the build of the extension fails quietly and pyvmm-kvm installs without it, its
pure-Python exit path in use (``pyvmm_kvm.fast_exits`` chooses at import).
"""

from __future__ import annotations

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """``build_ext`` where a failed extension is a warning, not a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler (or no headers) is a supported install
            _skipped(exc)

    def build_extension(self, ext: object) -> None:
        try:
            super().build_extension(ext)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - as above, for one extension
            _skipped(exc)


def _skipped(exc: BaseException) -> None:
    print(
        f"pyvmm-kvm: the compiled exit path was not built ({type(exc).__name__}: {exc}); the pure-Python one is used",
        file=sys.stderr,
    )


setup(cffi_modules=["src/pyvmm_kvm/_fast_exits_build.py:ffibuilder"], cmdclass={"build_ext": OptionalBuildExt})
