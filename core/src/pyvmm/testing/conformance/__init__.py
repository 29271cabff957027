"""The conformance suite: guest scenarios written once against the public API and
run against any installed backend (``pytest --pyvmm-backend NAME``).

A scenario that needs a capability the backend does not declare is skipped with
the capability's name as the reason; everything else must pass.
"""
