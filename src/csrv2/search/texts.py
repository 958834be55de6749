"""Texts indexed with their backbone: what `csrv2 search "query text"` needs to embed a query the way
the documents were embedded, and to print the hits' texts.

Beside an index file INDEX lies `INDEX.texts.json`: the backbone's name, max_seq_length and identity
(a digest of its weights and settings) and the documents' texts in id order. A search whose backbone
has another identity is refused: its queries would land in another space and the hits would be
silently wrong. The index file itself records the head's digest, and a search with another head is
refused the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..data.backbones import TextBackbone
from ..data.cache import EmbeddingCache
from ..errors import InputError
from ..head import SparseHead, encode
from .index import InvertedIndex
from .queries import encode_queries


def texts_path(index_path: str | os.PathLike) -> Path:
    return Path(f"{index_path}.texts.json")


def build_text_index(head: SparseHead, backbone: TextBackbone, texts: list[str], out: str | os.PathLike, *, k: int | None = None,
                     metric: str = "cosine", cache: EmbeddingCache | None = None, progress: bool = True) -> InvertedIndex:
    """Embed texts (through the cache), encode them with head, index the codes (recording the head's digest)
    and save index + texts at `out`.

    The texts file is written first, then the index, each atomically: an interrupted build leaves an
    old index with its old texts, or a new texts file the old index does not use (a search checks counts).
    """
    x = (cache or EmbeddingCache()).get(backbone, texts, progress=progress)
    index = InvertedIndex.build(encode(head, x, k, progress=progress), metric=metric, head_digest=head.digest())
    info = {"backbone": backbone.name, "max_seq_length": backbone.max_seq_length, "identity": backbone.identity, "texts": list(texts)}
    write_json(texts_path(out), info, indent=None)
    index.save(out)
    return index


def read_texts(index_path: str | os.PathLike, index: InvertedIndex) -> dict | None:
    """The texts file of an index (None when it has none); `InputError` when it does not belong to it."""
    path = texts_path(index_path)
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        texts = info["texts"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: damaged ({e}); build the index again with `csrv2 index build --data`") from e
    if len(texts) != len(index):
        raise InputError(f"{path}: holds {len(texts)} texts but the index {len(index)} vectors; build the index again")
    return info


def query_backbone(info: dict | None, model: str | None, max_seq_length: int | None, device: str = "cpu",
                   backbone: TextBackbone | None = None) -> TextBackbone:
    """The backbone that embeds queries: `backbone`, else the one named (or the index's own), checked against the index's identity."""
    if info is None and model is None and backbone is None:
        raise InputError("this index holds no texts, so it does not say which backbone embedded them; pass --backbone")
    backbone = backbone or TextBackbone(model or info["backbone"], device=device,
                                        max_seq_length=max_seq_length if max_seq_length is not None else (info or {}).get("max_seq_length"))
    if info is not None and backbone.identity != info["identity"]:
        raise InputError(
            f"backbone {backbone.name!r} (max_seq_length {backbone.model.max_seq_length}) is not the one that embedded this "
            f"index ({info['backbone']!r}, max_seq_length {info['max_seq_length']}); pass that one as --backbone"
        )
    return backbone


def search_texts(index: InvertedIndex, head: SparseHead, backbone: TextBackbone, queries: list[str], top_n: int = 10,
                 k: int | None = None, dense: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """ids, scores: (len(queries), min(top_n, len(index))), as `InvertedIndex.search`, for query texts coded
    at query k `k` (default: `queries.DEFAULT_QUERY_K`) or `dense` (`queries.encode_queries`).

    `InputError` when the index was built with another head (`InvertedIndex.check_head`) or a query is empty.
    """
    if not queries or any(not q.strip() for q in queries):
        raise InputError("a query text is empty; pass at least one non-empty query")
    index.check_head(head)
    return index.search(encode_queries(head, backbone.embed(queries, progress=False), k, dense), top_n)


def load_text_model(model: str | os.PathLike, backbone: str | None = None, max_seq_length: int | None = None, device: str = "auto", *,
                    load_backbone: bool = True) -> tuple[TextBackbone | None, SparseHead]:
    """(backbone, head) that embed and encode texts.

    model: a SparseEncoder folder (`csrv2 finetune`'s or anyone's), which brings both, its backbone's
    max_seq_length overridden when given; or a csrv2 head folder, whose backbone is then `backbone`
    (default: the packaged all-MiniLM-L6-v2) with `max_seq_length`, or None when not `load_backbone`
    (a search takes the index's own).
    """
    from ..config import resolve_device
    from ..export import read_sparse_encoder
    from ..model import load_head

    device = resolve_device(device)
    if (Path(model) / "modules.json").is_file():
        if backbone is not None:
            raise InputError(f"{model} is a SparseEncoder folder and brings its own backbone; drop --backbone")
        own, head = read_sparse_encoder(model)
        if max_seq_length is not None:
            own.model.max_seq_length = max_seq_length
        return own, head.to(device)
    head = load_head(model, device)
    if not load_backbone:
        return None, head
    return TextBackbone(backbone, device=str(device), max_seq_length=max_seq_length), head


__all__ = ["build_text_index", "load_text_model", "query_backbone", "read_texts", "search_texts", "texts_path"]
