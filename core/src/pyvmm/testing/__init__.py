"""Testing support for pyvmm and its backends: the conformance suite, the pytest
plugin (``--pyvmm-backend NAME``) and the in-process contract test backend."""
