"""Library exceptions. Each message is one line: what, where, what to do.

The CLI turns every one of these into a single ``Error:`` line and exit 1.
"""

import re


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


class DeadscanNote(DeadscanWarning):
    """A choice deadscan made for the user that they may want to know of (the CLI prints one ``Note:`` line)."""


# C0/C1 controls, DEL, line/paragraph separators and bidi overrides: bytes from a file that could move
# the cursor, recolour or reorder what a terminal shows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(s: str, limit: int | None = None) -> str:
    """``s`` with control characters escaped (``\\x1b``, ``\\u202e``), cut to ``limit`` characters if given:
    text read from a file (key names, metadata, pickle globals) reaches the terminal only this way."""
    text = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 256 else f"\\u{ord(m[0]):04x}", str(s))
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message folded onto one line, escaped and cut to ``limit`` characters (its type if empty)."""
    return printable(" ".join(str(e).split()) or type(e).__name__, limit)


def few(items: list[str], n: int = 5) -> str:
    """The first ``n`` items, comma-separated, and how many more."""
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
