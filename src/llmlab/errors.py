"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""


class LlmlabError(Exception):
    """A problem with the user's input (flags, files, checkpoints); the message says what to do."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (library messages often span many lines)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
