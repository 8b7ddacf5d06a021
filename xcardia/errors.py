"""The one exception type users see: a problem with their input or request, with what to do about it.

The CLI prints these as one line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class XcardiaError(ValueError):
    """Bad input or an impossible request. The message names the file/row/column and says what to do."""
