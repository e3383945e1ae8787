"""Atomic writes: a crash mid-save leaves the previous file intact, never a partial one."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List

import torch


def _atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temporary file beside ``path``, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Streams straight into the temporary file: no second copy of a large model in memory."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as source:
        _atomic(dst, lambda f: shutil.copyfileobj(source, f, 16 * 2**20))


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
    atomic_write_bytes(path, buf.getvalue().encode())


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


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: a pickle that would import or call anything
    beyond tensors and plain containers is refused, naming what it asked for, and never run."""
    import warnings

    from finetune_cli.errors import FinetuneError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4 ..."
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
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
