"""Errors a user can act on.

A ``MusefmError`` is printed by the CLI as one line (no traceback unless ``--debug``); anything
else is a bug and keeps its traceback.
"""


class MusefmError(Exception):
    """A problem with the user's input, files or settings, described in one line."""


class BadInputError(MusefmError):
    """One input file cannot be used; batch jobs record it in ``rejected.jsonl`` and go on."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
