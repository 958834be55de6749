"""The one error type csrv2 raises for bad input: a one-line message naming the problem and the fix."""


class InputError(ValueError):
    """Bad input (file, array, folder or option); `str(error)` is one line that says what to do."""
