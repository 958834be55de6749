"""Training data: dense embeddings (in memory or memory-mapped) with optional labels or paired documents.

Files are NumPy: `.npy` (memory-mapped, so data larger than RAM streams from disk), `.npz`
(loaded into memory) whose arrays are named `embeddings` and optionally `labels`, or `queries` and
`documents` for query/document pairs, or a folder of `.npy` shards with those names
(`embeddings-00000.npy`, `labels-00000.npy`, ...; `csrv2 embed --out FOLDER` writes one, a shard per
rank under torchrun), read as one memory-mapped array in shard order. Every check runs before any
training starts.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

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
            check_labels(self.labels)
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


class ShardedArray:
    """Row-wise concatenation of (n_i, d) memory-mapped shards, never copied whole: rows are read from
    the shards that hold them. Supports len, shape, dtype, ndim and indexing by a slice or an index array."""

    def __init__(self, shards: list[np.ndarray]):
        dims = {(s.shape[1:], s.dtype) for s in shards}
        if len(dims) != 1:
            raise InputError(f"shards have shapes/dtypes {sorted(str(d) for d in dims)}; every shard needs the same dims and dtype")
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])  # (n_shards + 1,)
        self.shape = (int(self.offsets[-1]), *shards[0].shape[1:])
        self.dtype, self.ndim = shards[0].dtype, len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows)
        which = np.searchsorted(self.offsets, rows, side="right") - 1  # the shard of each row
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for shard in np.unique(which):
            mask = which == shard
            out[mask] = self.shards[shard][rows[mask] - self.offsets[shard]]
        return out


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
        # Training and encoding read float32: a float64 value beyond its range (1e300) is finite here but Inf there.
        with np.errstate(over="ignore"):
            check_finite_rows(block, block.astype(np.float32, copy=False), name, start)


def check_finite_rows(block: np.ndarray, block32: np.ndarray, name: str, start: int = 0) -> None:
    """Raise `InputError` naming the first row of block32 (b, d), block (b, d) cast to float32, that is not finite.

    The check reads the cast values, so a float64 row that is finite but beyond float32's range is caught
    too; `block`, the values before the cast, only tells which of the two faults it is. start: the row
    number of the block's first row.
    """
    ok = np.isfinite(block32).all(axis=1)
    if ok.all():
        return
    row = int(np.argmin(ok))
    if np.isfinite(block[row]).all():
        raise InputError(f"{name} row {start + row} has values beyond float32's range (|x| > 3.4e38), which csrv2 computes in; "
                         "rescale the embeddings (e.g. normalise each row) before training or encoding")
    raise InputError(f"{name} row {start + row} has NaN or Inf values; drop or fix such rows before training or encoding")


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
    """Read the files of `csrv2 train`. An `.npz` or a folder of shards may carry labels or documents itself."""
    path = Path(embeddings)
    if path.is_dir():
        arrays = read_shards(path)
        x, y, docs = arrays.get("queries", arrays.get("embeddings")), arrays.get("labels"), arrays.get("documents")
    elif path.suffix == ".npz":
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


SHARD_NAMES = ("embeddings", "labels", "queries", "documents")


def read_shards(folder: Path) -> dict[str, ShardedArray | np.ndarray]:
    """The arrays of a folder of shards: NAME-NNNNN.npy for NAME in embeddings, labels, queries, documents;
    every name present must have a shard for each index. Labels are read into memory, the rest memory-mapped."""
    found = {name: sorted(folder.glob(f"{name}-*.npy")) for name in SHARD_NAMES}
    found = {name: files for name, files in found.items() if files}
    main = "queries" if "queries" in found else "embeddings"
    if main not in found or ("queries" in found) != ("documents" in found) or ("labels" in found and main == "queries"):
        raise InputError(f"{folder}: holds shards of {sorted(found) or 'nothing'}; a shard folder holds embeddings-*.npy "
                         "(+ labels-*.npy), or queries-*.npy and documents-*.npy")
    check_shard_numbers(folder, main, found[main])
    suffixes = [f.name[len(main):] for f in found[main]]
    for name, files in found.items():
        missing = sorted(set(suffixes) - {f.name[len(name):] for f in files})
        extra = sorted({f.name[len(name):] for f in files} - set(suffixes))
        if missing or extra:
            what = f"{name}{missing[0]} is missing" if missing else f"{name}{extra[0]} has no {main}{extra[0]}"
            raise InputError(f"{folder}: {what}; every shard needs all of {', '.join(found)}, with the same numbers")
    arrays = {name: ShardedArray([_load(f, (name,))[name] for f in files]) for name, files in found.items() if name != "labels"}
    if "labels" in found:
        parts = [np.asarray(_load(f, ("labels",))["labels"]) for f in found["labels"]]
        arrays["labels"] = np.concatenate(parts)
        sizes = [len(part) for part in parts]
        if sizes != [len(s) for s in arrays[main].shards]:
            raise InputError(f"{folder}: label shards have {sizes} rows but {main} shards {[len(s) for s in arrays[main].shards]}; "
                             "write them together")
    return arrays


def check_shard_numbers(folder: Path, name: str, files: list[Path]) -> None:
    """Raise `InputError` unless the shards NAME-NNNNN.npy are numbered 0, 1, 2, ... without a gap (a missing
    shard would silently drop its rows)."""
    numbers = [f.name[len(name) + 1 : -len(".npy")] for f in files]
    odd = [f.name for f, number in zip(files, numbers, strict=True) if not number.isdigit()]
    if odd:
        raise InputError(f"{folder}: {odd[0]} is not a numbered shard ({name}-00000.npy, {name}-00001.npy, ...); rename or move it")
    present = {int(number) for number in numbers}
    if len(present) < len(numbers):
        raise InputError(f"{folder}: two {name} shards have the same number ({', '.join(sorted(f.name for f in files))}); keep one of each")
    missing = min(set(range(len(present) + 1)) - present)
    if missing < max(present):
        raise InputError(f"{folder}: {name}-{missing:05d}.npy is missing ({len(present)} shards numbered up to {max(present)}); "
                         "shards are numbered from 0 without gaps, write the missing one or renumber them")


def class_ids(labels: np.ndarray) -> np.ndarray:
    """Any 1-D label array (ints, strings) -> (n,) int64 class ids; equal labels get equal ids."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"labels must be 1-D (one per embedding), got shape {labels.shape}")
    check_labels(labels)
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def check_labels(labels: np.ndarray) -> None:
    """Raise `InputError` if a float label array (n,) holds NaN: a missing label, which np.unique would make one class of its own."""
    if np.issubdtype(labels.dtype, np.floating):
        missing = np.isnan(labels)
        if missing.any():
            raise InputError(f"label row {int(np.argmax(missing))} is NaN ({int(missing.sum())} of {len(labels)} rows); "
                             "give every row a label or drop the unlabelled rows")


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
