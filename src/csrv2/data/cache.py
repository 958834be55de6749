"""Embedding cache on disk: embed a data set once per backbone, reuse it on every later run.

An entry is `<key>.npy` (the (n, dim) float32 embeddings) plus `<key>.json` (what made them: the
backbone identity, the data fingerprint, the shape and the sha256 of the .npy bytes). The key hashes
the backbone identity and the data content, so a changed model or data set misses and re-embeds.
An entry that is damaged, half-written or made by something else is reported in one line and rebuilt;
both files are written to a temporary name and then renamed, so an interrupted run leaves no entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from ..atomic import write_file, write_json
from .backbones import Backbone


def default_cache_dir() -> Path:
    """$CSRV2_CACHE, else ~/.cache/csrv2."""
    return Path(os.environ.get("CSRV2_CACHE") or Path.home() / ".cache" / "csrv2")


def fingerprint(items: list[str] | np.ndarray) -> str:
    """sha256 of a list of texts (each length-prefixed, so boundaries count) or of an array's dtype, shape and bytes."""
    digest = hashlib.sha256()
    if isinstance(items, np.ndarray):
        digest.update(f"array:{items.dtype.str}:{items.shape}".encode())
        digest.update(np.ascontiguousarray(items).data)
    else:
        for text in items:
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


class EmbeddingCache:
    """`get(backbone, items)` returns the cached (n, dim) embeddings of items, embedding them on a miss."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else default_cache_dir() / "embeddings"

    def key(self, backbone: Backbone, data: str) -> str:
        return hashlib.sha256(f"{backbone.identity}\0{data}".encode()).hexdigest()[:32]

    def get(self, backbone: Backbone, items: list[str] | np.ndarray, progress: bool = True) -> np.ndarray:
        data = fingerprint(items)
        key = self.key(backbone, data)
        cached = self._read(key, backbone, data, len(items))
        if cached is not None:
            return cached
        x = backbone.embed(items, progress=progress)
        self._write(key, x, {"backbone": backbone.name, "identity": backbone.identity, "data": data})
        return x

    def _read(self, key: str, backbone: Backbone, data: str, n: int) -> np.ndarray | None:
        array, meta = self.folder / f"{key}.npy", self.folder / f"{key}.json"
        if not array.exists() and not meta.exists():
            return None
        try:
            info = json.loads(meta.read_text())
            expected = {"identity": backbone.identity, "data": data, "shape": [n, info["shape"][1]], "sha256": _file_sha256(array)}
            wrong = [name for name, value in expected.items() if info.get(name) != value]
            if wrong:
                raise ValueError(f"its {', '.join(wrong)} do not match")
            x = np.load(array, allow_pickle=False)
            if x.dtype != np.float32 or list(x.shape) != info["shape"]:
                raise ValueError(f"it holds {x.dtype} {x.shape}")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            warnings.warn(f"embedding cache entry {array} is unusable ({e}); embedding again", stacklevel=3)
            return None
        return x

    def _write(self, key: str, x: np.ndarray, info: dict) -> None:
        array, meta = self.folder / f"{key}.npy", self.folder / f"{key}.json"
        write_file(array, lambda f: np.save(f, x))
        # last: an entry without its final JSON is never trusted (and one whose file another process
        # replaced since fails its sha256 and is rebuilt)
        write_json(meta, {**info, "shape": list(x.shape), "sha256": _file_sha256(array)}, indent=1)


__all__ = ["EmbeddingCache", "default_cache_dir", "fingerprint"]
