"""`csrv2 embed`: a packaged data set or a user file -> arrays ready for `csrv2 train`, through the cache.

The arrays are named as `csrv2 train --embeddings X.npz` reads them: `embeddings` (+ `labels`), or
`queries` and `documents` for pairs; into one `.npz`, or as `.npy` shards into a folder (NAME-NNNNN.npy),
one per rank under torchrun, each rank embedding its contiguous part of the rows (`embed_to`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import distributed as dist
from ..atomic import write_file
from ..config import resolve_device
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
    try:
        if pairs:
            queries, documents = read_pairs(source, query_column, document_column)
            return {"queries": queries, "documents": documents}
        if Path(source).suffix == ".npz":
            images, labels = read_images(source)
            return {"images": images, "labels": labels}
        texts, labels = read_table(source, text_column, label_column)
    except UnicodeDecodeError as e:  # a reader that decodes line by line meets the bad byte while reading
        raise InputError(f"{source}: is not UTF-8 text ({e}); save the file as UTF-8") from e
    return {"texts": texts} if labels is None else {"texts": texts, "labels": labels}


def backbone_for(items: dict, model: str | None = None, *, max_seq_length: int | None = None, image_size: int = 64,
                 batch_size: int = 32, device: str = "cpu") -> TextBackbone | ImageBackbone:
    """The backbone that embeds what `read_source` returned: EfficientNet-Lite0 for images, else the text model."""
    if "images" in items:
        return ImageBackbone(image_size, device=device)
    return TextBackbone(model, device=device, max_seq_length=max_seq_length, batch_size=batch_size)


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
    backbone = backbone_for(items, model, max_seq_length=max_seq_length, image_size=image_size, batch_size=batch_size, device=device)
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
    return [write_file(Path(folder) / f"{name}-{index:05d}.npy", lambda f, a=array: np.save(f, np.asarray(a)))
            for name, array in arrays.items()]


def save_arrays(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write the arrays as one .npz, to a temporary name and then renamed over `path`."""
    return write_file(npz_path(path), lambda f: np.savez(f, **arrays))


SHARD_PATTERN = "*-[0-9]*.npy"


def embed_to(out: str | os.PathLike, source: str, *, overwrite: bool = False, device: str = "auto", progress: bool = True,
             **embed) -> tuple[dict[str, np.ndarray], int]:
    """Embed `source` (`embed_source(source, **embed)`) into `out`: one .npz, or a folder of .npy shards.

    A folder gets one shard per rank under torchrun, each rank embedding its contiguous part of the
    rows; the shards it already holds are replaced only with `overwrite`. Every check runs before any
    embedding. Returns this rank's arrays and the number of shards (0 for an .npz).
    """
    out = Path(out)
    if out.suffix not in ("", ".npz") and not out.is_dir():
        raise InputError(f"{out}: give a path ending in .npz, or a folder (a name without a suffix) for .npy shards")
    if out.suffix == ".npz" and out.is_dir():
        raise InputError(f"{out}: is a folder; pass a file path ending in .npz, or a folder name without a suffix for shards")
    shards = out.suffix != ".npz"
    device = dist.init(resolve_device(device))  # under torchrun: one shard per rank
    if not shards and dist.world_size() > 1:
        raise InputError(f"{out}: under torchrun every rank writes a shard; pass a folder as --out")
    if shards:
        _clear_shards(out, overwrite)
    arrays = embed_source(source, device=str(device), progress=progress and dist.is_main(), part=(dist.rank(), dist.world_size()), **embed)
    if shards:
        save_shard(arrays, out, dist.rank())
    else:
        save_arrays(arrays, out)
    dist.barrier()
    return arrays, dist.world_size() if shards else 0


def _clear_shards(folder: Path, overwrite: bool) -> None:
    """Make `folder` ready for new shards on every rank: refuse a file, or old shards unless overwrite (then rank 0 deletes them)."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; pass a .npz file or a folder for shards")
    if folder.is_dir() and any(folder.glob(SHARD_PATTERN)) and not overwrite:
        raise InputError(f"{folder}: already holds shards; pass --overwrite to replace them or choose another folder")
    dist.barrier()  # every rank has looked before rank 0 clears the folder
    if dist.is_main():
        for old in folder.glob(SHARD_PATTERN):
            old.unlink()
    dist.barrier()


__all__ = ["SPLITS", "backbone_for", "embed_source", "embed_to", "npz_path", "read_source", "save_arrays", "save_shard", "texts_of"]
