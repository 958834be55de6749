"""`csrv2 embed`: a packaged data set or a user file -> arrays ready for `csrv2 train`, through the cache.

The arrays are named as `csrv2 train --embeddings X.npz` reads them: `embeddings` (+ `labels`), or
`queries` and `documents` for pairs; into one `.npz`, or as `.npy` shards into a folder (NAME-NNNNN.npy),
one per rank under torchrun, each rank embedding its contiguous part of the rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import write_file
from ..errors import InputError
from .backbones import ImageBackbone, TextBackbone
from .cache import EmbeddingCache
from .datasets import DATASETS, LabelledImages, LabelledTexts, SimilarityPairs, TextPairs, load_dataset, read_images, read_pairs, read_table

SPLITS = ("train", "test")


def _packaged(name: str, split: str, max_rows: int | None, seed: int):
    dataset = load_dataset(name, **({} if name == "lee50" else {"seed": seed, f"max_{split}": max_rows}))
    if isinstance(dataset, SimilarityPairs):
        return {"texts": dataset.texts}
    if isinstance(dataset, TextPairs):
        return {"queries": getattr(dataset, f"{split}_queries"), "documents": getattr(dataset, f"{split}_documents")}
    items = getattr(dataset, f"{split}_texts" if isinstance(dataset, LabelledTexts) else f"{split}_images")
    return {"images" if isinstance(dataset, LabelledImages) else "texts": items, "labels": getattr(dataset, f"{split}_labels")}


def texts_of(source: str, split: str = "test", text_column: str = "text", max_rows: int | None = None, seed: int = 0) -> list[str]:
    """The texts to index from a packaged data set's split (a retrieval set's documents) or a table file's text column."""
    items = read_source(source, split=split, text_column=text_column, label_column=None, max_rows=max_rows, seed=seed)
    if "images" in items:
        raise InputError(f"{source} holds images; a text index needs texts")
    return list(items.get("documents", items.get("texts")))


def read_source(
    source: str,
    *,
    split: str = "train",
    pairs: bool = False,
    text_column: str = "text",
    label_column: str | None = "label",
    query_column: str = "query",
    document_column: str = "document",
    max_rows: int | None = None,
    seed: int = 0,
) -> dict:
    """What a packaged data set's split (source = its name) or a file holds: {"texts", "labels"} (no
    "labels" when label_column is None), {"queries", "documents"} (pairs=True, or a retrieval set),
    {"texts"} (Lee-50) or {"images", "labels"} (an .npz file or an image set)."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if source in DATASETS:
        return _packaged(source, split, max_rows, seed)
    if not Path(source).exists():
        raise InputError(f"{source}: neither a packaged data set ({', '.join(DATASETS)}) nor an existing file")
    if pairs:
        queries, documents = read_pairs(source, query_column, document_column)
        return {"queries": queries, "documents": documents}
    if Path(source).suffix == ".npz":
        images, labels = read_images(source)
        return {"images": images, "labels": labels}
    texts, labels = read_table(source, text_column, label_column)
    return {"texts": texts} if labels is None else {"texts": texts, "labels": labels}


def embed_source(
    source: str,
    *,
    model: str | None = None,
    max_seq_length: int | None = None,
    image_size: int = 64,
    batch_size: int = 32,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    part: tuple[int, int] = (0, 1),
    **read,
) -> dict[str, np.ndarray]:
    """Embed what `read_source(source, **read)` holds, through the cache; returns the named arrays of a
    training file: embeddings (+ labels), or queries and documents. part = (i, parts): only the i-th of
    `parts` contiguous slices of the rows (a rank's shard)."""
    items = read_source(source, **read)
    n = len(next(iter(items.values())))
    rows = slice(n * part[0] // part[1], n * (part[0] + 1) // part[1])
    items = {name: values[rows] for name, values in items.items()}
    backbone = (ImageBackbone(image_size, device=device) if "images" in items
                else TextBackbone(model, device=device, max_seq_length=max_seq_length, batch_size=batch_size))
    cache = EmbeddingCache(Path(cache_dir) / "embeddings" if cache_dir else None)
    out = {}
    for name, values in items.items():
        if name == "labels":
            out["labels"] = np.asarray(values)
        else:
            out["embeddings" if name in ("texts", "images") else name] = cache.get(backbone, values, progress=progress)
    return out


def npz_path(path: str | os.PathLike) -> Path:
    """`path` as a Path, or `InputError` unless it ends in .npz (checked before any embedding work)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"{path}: embeddings are written as .npz; give a path ending in .npz")
    return path


def save_shard(arrays: dict[str, np.ndarray], folder: str | os.PathLike, index: int) -> list[Path]:
    """Write each array as folder/NAME-{index:05d}.npy (to a temporary name, then renamed): one shard of a shard folder."""
    return [write_file(Path(folder) / f"{name}-{index:05d}.npy", lambda f, a=array: np.save(f, np.asarray(a))) for name, array in arrays.items()]


def save_arrays(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write the arrays as one .npz, to a temporary name and then renamed over `path`."""
    return write_file(npz_path(path), lambda f: np.savez(f, **arrays))


__all__ = ["SPLITS", "embed_source", "npz_path", "read_source", "save_arrays", "save_shard", "texts_of"]
