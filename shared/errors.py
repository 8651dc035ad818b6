"""The one exception family for problems with what the user gave us.

A ``UserError`` (a bad file, config value, argument, an unwritable output, two files that
cannot be combined) is printed by the command-line tools as one line and exits 2. Anything
else (out of memory, a bug) is not caught there: it keeps its traceback and exits 1, so real
bugs stay visible.
"""


class UserError(ValueError):
    """A problem with the user's input or environment, stated in one sentence that names the
    file, key or field and what was expected."""


class OutputError(UserError):
    """An output file or folder cannot be written (permissions, a file where a folder should
    be, a full disk). The message names the path and the operating system's reason."""


class IncompatibleFiles(UserError):
    """Two inputs that cannot be combined (fused, compared, exported together); the message
    names both sides and what differs."""
