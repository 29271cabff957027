"""The test bed's errors: each names what is wrong and how to put it right."""

from __future__ import annotations


class TestbedError(Exception):
    """The bed could not be built or booted."""

    __test__ = False  # not a pytest test class, despite the name


class UsageError(TestbedError):
    """A bed, mode or option that does not exist."""


class MissingTool(TestbedError):
    """A host program or package the bed needs is not installed."""


class GuestTimeout(TestbedError):
    """The guest did not finish within the hard timeout."""


class GuestFailure(TestbedError):
    """The guest stopped without delivering its result."""
