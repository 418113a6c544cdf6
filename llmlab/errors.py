"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""


class LlmlabError(Exception):
    """A problem with the user's input (flags, files, checkpoints); the message says what to do."""
