"""``python -m pyvmm``: the same as the ``pyvmm`` command."""

from pyvmm.cli import console_main

console_main()
