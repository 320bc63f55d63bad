"""Library exceptions. Each message is one line: what, where, what to do.

The CLI turns every one of these into a single ``Error:`` line and exit 1.
"""


class DeadscanError(Exception):
    """Base class for every error deadscan reports to a user."""


class CheckpointError(DeadscanError):
    """A checkpoint cannot be read, is refused, or does not fit its architecture."""


class ArchError(DeadscanError):
    """An architecture spec cannot be parsed or built."""


class TraceError(DeadscanError):
    """The model cannot be traced or run as needed."""


class DataError(DeadscanError):
    """A dataset cannot be found, read, or fed to the model."""


class OutputError(DeadscanError):
    """An output cannot be written."""


class DeadscanWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints one ``Warning:`` line)."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message folded onto one line and cut to ``limit`` characters (its type if empty)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
