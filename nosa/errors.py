"""What counts as the user's mistake, for the one error path of the `nosa` command (nosa.command).

Validation everywhere in nosa raises `ValueError` (a bad value, named) or `FileNotFoundError` (a path that
is not there); `UsageError` is a `ValueError` for checks that live in the command layer. These are
reported as the message alone with exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A bad flag, file or environment the user can fix; the message says what to do."""


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
