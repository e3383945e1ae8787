"""The one exception type for user mistakes: printed as a single paragraph, never a traceback."""

from hydra.errors import CompactHydraException


class FinetuneError(CompactHydraException):
    """A problem the user can fix: the message names the problem and the remedy."""


class Refused(FinetuneError):
    """A run refused before it did anything, in a folder that may hold an earlier run's files
    (a resume with other settings): the folder is left exactly as it was, summary.json included."""


class Truncated(FinetuneError):
    """A file cut short or corrupted (a full disk, an unfinished copy): another copy may be whole."""


class UnreadableImage(FinetuneError):
    """An image that failed to load while training or evaluating: changed or made unreadable
    after the data check, or never checked (``data.check_images=false``).

    Raised in a loader worker, it reaches the main process re-made from its text, which then
    carries the worker's traceback: only the message itself is kept."""

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            message = message.rsplit(f"{type(self).__name__}: ", 1)[-1].strip()
        super().__init__(message)


def unreadable_image(path: str, cause: BaseException) -> UnreadableImage:
    first = (str(cause).splitlines() or [""])[0][:160]
    return UnreadableImage(
        f"Image {path} could not be read ({type(cause).__name__}: {first}). The data check "
        "(data.check_images=true, the default) opens every image before training; a file that fails later "
        "was changed, replaced or made unreadable after its check. Fix or delete it (data.on_bad_image=skip "
        "leaves bad files out), then run again; the epochs already saved are kept, and trainer.resume "
        "continues from them."
    )


STORAGE_ERRNOS = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is used up",
                  "EROFS": "the file system is read-only", "EACCES": "permission denied",
                  "EPERM": "permission denied", "EFBIG": "the file is over the size limit"}


def storage_problem(exc: BaseException, started: bool = True) -> "FinetuneError | None":
    """A write that failed for want of space or permission, as one paragraph; None for other errors.
    ``started=False``: nothing had run yet."""
    import errno

    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    name = errno.errorcode.get(exc.errno, "")
    if name not in STORAGE_ERRNOS:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    if name in ("ENOSPC", "EDQUOT", "EFBIG"):
        remedy = "Free some space (or write elsewhere: hydra.run.dir=DIR), then run again"
    else:
        remedy = "Make the folder writable for this user, or write elsewhere (hydra.run.dir=DIR), then run again"
    after = ("; files written before stay as they were (each file is replaced whole or not at all), and "
             "trainer.resume continues from the last checkpoint saved." if started else ". Nothing was run.")
    return FinetuneError(f"Could not write{where}: {STORAGE_ERRNOS[name]} ({exc.strerror}). {remedy}{after}")
