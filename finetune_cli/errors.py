"""The one exception type for user mistakes: printed as a single paragraph, never a traceback."""

from hydra.errors import CompactHydraException


class FinetuneError(CompactHydraException):
    """A problem the user can fix: the message names the problem and the remedy."""
