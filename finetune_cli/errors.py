"""The one exception type for user mistakes: printed as a single paragraph, never a traceback."""

from hydra.errors import CompactHydraException


class FinetuneError(CompactHydraException):
    """A problem the user can fix: the message names the problem and the remedy."""


class Refused(FinetuneError):
    """A run refused before it did anything, in a folder that may hold an earlier run's files
    (a resume with other settings): the folder is left exactly as it was, summary.json included."""


class Truncated(FinetuneError):
    """A file cut short or corrupted (a full disk, an unfinished copy): another copy may be whole."""
