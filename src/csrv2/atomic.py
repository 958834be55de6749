"""Writing files and folders whole or not at all: every file csrv2 writes goes through here.

A file is written to a temporary name beside its target, flushed to disk, then renamed over the
target. The temporary name is unique per writer (the process id and random characters, from
`tempfile`), so two processes writing the same path each build their own file and the last rename
wins: a reader sees the old file or one of the new ones, never a mix, and an interrupted write
leaves the old file as it was. A folder is built the same way and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import InputError

FILE_MODE, FOLDER_MODE = 0o644, 0o755  # tempfile makes both private; what csrv2 writes is meant to be read by others


def write_file(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call write(f) on a binary file open at a unique temporary name beside `path`, then rename it over `path`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_file(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """JSON with sorted keys; indent None writes one compact line (large files such as an index's texts)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def write_folder(out: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Build a folder with fill(tmp) in a temporary folder beside `out`, then rename it into place.

    A failure leaves no half folder; an existing `out` is refused unless overwrite, and then replaced
    only once the new one is whole.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
    try:
        tmp.chmod(FOLDER_MODE)
        fill(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rename(out, old / out.name)  # moved aside whole, so the new folder takes its name in one rename
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["write_bytes", "write_file", "write_folder", "write_json", "write_text"]
