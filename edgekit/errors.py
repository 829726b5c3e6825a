"""The one exception type users see: a clear, single-line reason that the CLI prints before exiting 1."""


class EdgekitError(Exception):
    """A failure caused by input or environment, with a message that names what was wrong."""


class ContextExceeded(EdgekitError):
    """A sequence would not fit the bundle's context length; the message has the numbers."""
