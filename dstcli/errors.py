"""The one exception type dstcli raises for problems a user can fix.

Its message is a full sentence naming the file or tensor and the fix; the CLI prints it as a
single `Error: ...` line and exits with code 1.
"""


class DstError(Exception):
    """A user-facing error: bad input, wrong base, corrupt patch, impossible budget."""
