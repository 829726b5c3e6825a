"""The one exception type users see: a clear, single-line reason that the CLI prints before exiting 1."""


class EdgekitError(Exception):
    """A failure caused by input or environment, with a message that names what was wrong."""

    exit_code = 1  # the CLI's exit status for it


class BundleDamaged(EdgekitError):
    """A bundle's files do not match its manifest: missing, extra, truncated or changed. Unlike an
    unsigned or wrongly signed bundle, a damaged copy is worth sending again."""

    exit_code = 3


class ContextExceeded(EdgekitError):
    """A sequence would not fit the bundle's context length; the message has the numbers."""


class BelowQualityGate(EdgekitError):
    """A bundle computes too far from its shipped reference on this machine's kernels (the quality
    check on the device). The daemon's unit does not restart on it (RestartPreventExitStatus=4): it
    would compute the same again."""

    exit_code = 4
