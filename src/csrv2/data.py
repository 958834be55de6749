"""Training data: dense embeddings (in memory or memory-mapped) with optional labels or paired documents.

Files are NumPy: `.npy` (memory-mapped, so data larger than RAM streams from disk) or `.npz`
(loaded into memory) whose arrays are named `embeddings` and optionally `labels`, or `queries` and
`documents` for query/document pairs. Every check runs before any training starts.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

NPZ_NAMES = "embeddings (+ labels), or queries and documents"


@dataclass(frozen=True)
class TrainingData:
    """embeddings: (n, d) float; labels: (n,) int64 class ids or None; documents: (n, d) or None.

    With documents, row i of `embeddings` is a query and row i of `documents` its relevant document.
    """

    embeddings: np.ndarray
    labels: np.ndarray | None = None
    documents: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_embeddings(self.embeddings, "embeddings")
        if self.labels is not None:
            if self.labels.ndim != 1 or len(self.labels) != len(self.embeddings):
                raise InputError(
                    f"labels have shape {self.labels.shape} but there are {len(self.embeddings)} embeddings; "
                    "pass one label per embedding row"
                )
        if self.documents is not None:
            check_embeddings(self.documents, "documents")
            if self.documents.shape != self.embeddings.shape:
                raise InputError(
                    f"documents have shape {self.documents.shape} but queries {self.embeddings.shape}; "
                    "pairs need one document row per query row, from the same backbone"
                )
        if self.labels is not None and self.documents is not None:
            raise InputError("give labels or documents, not both: labels train the supervised loss, documents the pairs loss")

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]


def check_embeddings(x: np.ndarray, name: str, chunk_rows: int = 65536) -> None:
    """Raise `InputError` unless x is a non-empty (n, d) float array of finite values.

    Reads memory-mapped files chunk by chunk, so the check costs one pass and bounded memory.
    """
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D (n, dim) array, got shape {x.shape}; stack the vectors into one matrix")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {x.shape}); pass at least one embedding")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{name} have dtype {x.dtype}; embeddings must be float16/32/64")
    for start in range(0, len(x), chunk_rows):
        block = np.asarray(x[start : start + chunk_rows])
        ok = np.isfinite(block).all(axis=1)
        if not ok.all():
            row = start + int(np.argmin(ok))
            raise InputError(f"{name} row {row} has NaN or Inf values; drop or fix such rows before training or encoding")


def load_array(path: str | os.PathLike, name: str = "embeddings") -> np.ndarray:
    """Read one array: a `.npy` (memory-mapped) or the array called `name` in a `.npz`.

    An `.npz` with a single array of another name is accepted. Pickled data is refused.
    """
    return _load(path, (name,))[name]


def load_training_data(
    embeddings: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    documents: str | os.PathLike | None = None,
) -> TrainingData:
    """Read the files of `csrv2 train`. An `.npz` may carry labels or documents itself."""
    path = Path(embeddings)
    if path.suffix == ".npz":
        arrays = _load(path, ("embeddings", "labels", "queries", "documents"), optional=True)
        if "queries" in arrays and "documents" in arrays:
            x, y, docs = arrays["queries"], None, arrays["documents"]
        elif "embeddings" in arrays:
            x, y, docs = arrays["embeddings"], arrays.get("labels"), None
        else:
            raise InputError(f"{path}: found arrays {sorted(arrays) or 'none'}; name them {NPZ_NAMES}")
    else:
        x, y, docs = load_array(path), None, None
    if labels is not None:
        y = load_array(labels, "labels")
    if documents is not None:
        docs = load_array(documents, "documents")
    return TrainingData(x, None if y is None else class_ids(y), docs)


def class_ids(labels: np.ndarray) -> np.ndarray:
    """Any 1-D label array (ints, strings) -> (n,) int64 class ids; equal labels get equal ids."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"labels must be 1-D (one per embedding), got shape {labels.shape}")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def _load(path: str | os.PathLike, names: tuple[str, ...], optional: bool = False) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; pass the path of a .npy or .npz file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; write it again with numpy.save")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                found = {n: f[n] for n in f.files}
        else:
            found = {names[0]: np.load(path, mmap_mode="r", allow_pickle=False)}
    except ValueError as e:
        with open(path, "rb") as f:
            # numpy calls any unknown bytes pickled; a real pickle starts with 0x80, an object array says so
            pickled = f.read(1) == b"\x80" or "Object arrays" in str(e)
        if pickled:
            raise InputError(f"{path}: holds pickled Python objects, which csrv2 never loads; save a numeric array with numpy.save") from e
        raise InputError(f"{path}: cannot be read as a NumPy {path.suffix or '.npy'} file ({e}); write it with numpy.save") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: cannot be read as a NumPy {path.suffix or '.npy'} file ({e}); write it with numpy.save") from e
    if optional:
        return found
    if names[0] not in found:
        if len(found) != 1:
            raise InputError(f"{path}: no array named {names[0]!r} (found {sorted(found)}); name it {names[0]!r}")
        found = {names[0]: next(iter(found.values()))}
    return found
