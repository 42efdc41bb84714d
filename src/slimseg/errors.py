"""The exception types that slimseg raises for problems a user can fix."""


class SlimsegError(Exception):
    """A user-facing error: its message is one line that names the input and the reason.

    The command line prints the message alone (no traceback) and exits with ``exit_code``.
    """

    exit_code = 1


class UsageError(SlimsegError):
    """A malformed command-line argument or option combination (exit status 2)."""

    exit_code = 2


class DeviceOutOfMemory(SlimsegError):
    """The device ran out of memory. Commands that process many inputs stop at this error
    instead of going on to the next input, which would fail the same way."""
