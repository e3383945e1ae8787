"""Atomic writes: a crash mid-save leaves the previous file intact, never a partial one."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional

import torch

TMP_SUFFIX = ".tmp"


def text_bytes(text: str) -> bytes:
    """``text`` as UTF-8 for a file. A file name that is not valid UTF-8 (Python holds its odd bytes
    as surrogates) is written back as the very bytes it has on disk, so the line names the file."""
    return text.encode("utf-8", "surrogateescape")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an OS lock on ``folder`` (its ``.lock`` file, never written to) while a run uses it:
    a second process is refused. The lock ends with the process, however it ends (``kill -9``
    included)."""
    from finetune_cli.errors import Refused

    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise Refused(
                f"Another finetune-cli process is running in {folder}, and two runs in one folder would write "
                "over each other's files. Wait for it to end, or give this run a folder of its own "
                "(hydra.run.dir=...). Nothing was changed."
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def waiting_lock(lock_file: Path, waiting: str) -> Iterator[None]:
    """Hold an OS lock on ``lock_file``, waiting for another process that holds it (two sweep
    jobs pretraining the same weights: the second waits, then finds the first's file).
    ``waiting`` is logged when there is a wait."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            import logging

            logging.getLogger("finetune_cli").info(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Temporary files of saves that never finished (``kill -9`` or a second signal mid-save),
    removed from ``folder`` and its checkpoints/. Only call it holding the folder's lock."""
    removed = []
    for where in (Path(folder), Path(folder) / "checkpoints"):
        if where.is_dir():
            for tmp in where.glob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


class _KeepsWriteErrors:
    """A file that keeps the error of a failed write: torch.save reports a write that failed (a
    full disk) as a RuntimeError about positions in its archive, without the OSError behind it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temporary file beside ``path``, fsync, then rename. A write
    that fails for want of space raises that OSError, whatever ``write`` made of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    kept = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; files follow the umask like any other
        with os.fdopen(fd, "wb") as f:
            kept = _KeepsWriteErrors(f)
            write(kept)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failed = kept.error if kept is not None and kept.error is not None else exc
        if isinstance(failed, OSError) and failed.errno and not failed.filename:  # name the file
            raise OSError(failed.errno, failed.strerror, str(path)) from None
        if failed is not exc:
            raise failed from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Streams straight into the temporary file: no second copy of a large model in memory."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as source:
        _atomic(dst, lambda f: shutil.copyfileobj(source, f, 16 * 2**20))


def atomic_link(src: Path, dst: Path) -> None:
    """``dst`` becomes a second name of ``src`` (a hard link): the same bytes, stored once. Sound
    because nothing here changes a file in place: every save writes a new file and renames it over
    the old name, so the next save of ``src`` leaves ``dst`` holding what it holds now. Where a
    link cannot be made (another filesystem, one without hard links), the bytes are copied."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if not dst.is_symlink() and os.path.samefile(src, dst):
            return  # already one file (renaming a link onto its own file would do nothing)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}"
    try:
        os.link(src, tmp)
    except OSError:
        atomic_copy(src, dst)
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    fields: List[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text_bytes(buf.getvalue()))


SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.slice",
                        "numpy.core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray", "_codecs.encode")


def pickle_globals(path: Path) -> List[str]:
    """The names a pickle (plain, or inside a torch zip archive) would import, read from its
    opcodes without executing anything."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                blobs = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        else:
            blobs = [Path(path).read_bytes()]
    except (OSError, zipfile.BadZipFile):
        return []
    found: List[str] = []
    for blob in blobs:
        strings: List[str] = []
        try:
            for op, arg, _ in pickletools.genops(blob):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # a damaged pickle: report what was read so far
            pass
    return list(dict.fromkeys(found))


def refused_globals(path: Path) -> List[str]:
    """What a pickle that ``weights_only=True`` refused would import. For a torch zip archive,
    torch's own list of the globals its weights-only unpickler does not allow (where this torch
    has ``get_unsafe_globals_in_checkpoint``); otherwise an opcode scan (``pickle_globals``)."""
    import zipfile

    unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if unsafe is not None and zipfile.is_zipfile(path):
        try:
            return list(unsafe(path))
        except Exception:  # a damaged archive: fall back to reading the opcodes
            pass
    return [g for g in pickle_globals(path) if not g.startswith(SAFE_GLOBAL_PREFIXES)]


def _truncated(path: Path, exc: Exception) -> bool:
    """A torch zip archive cut short (its central directory, at the end, is missing), or an
    error that says so."""
    import zipfile

    if _head(path) == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return True
    text = str(exc)
    return any(m in text for m in ("failed finding central directory", "unexpected EOF", "Ran out of input"))


def _head(path: Path) -> Optional[bytes]:
    """A file's first 4 bytes (None when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return None


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save's format) or a pickle (protocol 2 and up start with 0x80)."""
    head = _head(path)
    return head is None or head.startswith((b"PK", b"\x80"))


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: a pickle that would import or call anything
    beyond tensors and plain containers is refused, naming what it asked for, and never run."""
    import warnings

    from finetune_cli.errors import FinetuneError, Truncated

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4 ..."
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if _truncated(path, exc):
            raise Truncated(
                f"{path} is truncated or corrupt ({str(exc).splitlines()[0][:100]}). It was probably cut "
                "short by a full disk or a copy that did not finish. Use another copy, or another checkpoint."
            ) from None
        if isinstance(exc, OSError):
            raise
        if not _looks_like_torch_file(path):
            raise FinetuneError(
                f"{path} is not a PyTorch file (neither a torch.save zip archive nor a pickle). Give a file saved "
                "with torch.save(model.state_dict(), path), a finetune-cli checkpoint, or .safetensors."
            ) from None
        blocked = refused_globals(path)
        if blocked:
            detail = f"it would import {', '.join(blocked[:5])}, which is not allowed"
        else:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise FinetuneError(
            f"Refused to load {path}: {detail}. finetune-cli reads .pt/.pth files with weights_only=True, so a "
            "file that would run code when unpickled is never executed. Use a plain state dict "
            "(torch.save(model.state_dict(), path)), a finetune-cli checkpoint, or .safetensors."
        ) from None
