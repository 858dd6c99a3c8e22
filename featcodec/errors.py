"""Errors that mean "bad input": the CLI prints their one-line message and exits 2."""


class FeatcodecError(ValueError):
    """Base class for every user-facing featcodec error; the message is one line."""
