"""The one exception family for user errors.

The CLI turns an :class:`EdgeqError` into one line on stderr and exit code 1, without a
traceback (``--verbose`` shows it). Anything else escaping is a bug in edgeq.
"""


class EdgeqError(Exception):
    """A problem with the user's input: a file, an argument, a model, a dataset."""

    def __init__(self, message: str, note: str | None = None):
        super().__init__(message)
        self.note = note

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\nNote: {self.note}" if self.note else base
