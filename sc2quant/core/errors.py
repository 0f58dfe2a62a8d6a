"""The one exception type for problems the user can fix (bad input, missing files, ...).

The CLI prints its message as a single line and exits with status 2; Python callers catch it.
Messages name the problem and the fix: "X is wrong: do Y".
"""


class UserError(Exception):
    """A problem with the user's input or environment, with a one-line explanation."""


class IntegrityError(UserError):
    """An artifact on disk does not match its manifest (tampered, truncated, or incomplete)."""
