"""Export `SparseCodes` to a Qdrant collection and search it there: the same exact top-n as
`InvertedIndex`, served by Qdrant (a server via `QdrantClient(url=...)`, or its local mode).

A collection holds one named sparse vector, `VECTOR`, and no dense vectors; each point is one code
with its unused (zero) slots dropped and its latents ascending. Qdrant scores sparse vectors by dot
product, so metric "cosine" uploads (and queries with) each code divided by its L2 norm. The csrv2
settings are kept in the collection's metadata, {"csrv2": {"dim": ..., "metric": ...}}, where the
client supports it (qdrant-client >= 1.16); `search_codes` checks them when present.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..codes import SparseCodes
from ..errors import InputError
from .index import METRICS, export_rows, query_weights

try:
    from qdrant_client import QdrantClient, models
except ImportError as e:
    raise ImportError('csrv2.search.qdrant needs qdrant-client: pip install "csrv2[qdrant]"') from e

VECTOR = "csrv2"  # the collection's one named sparse vector


def _point_id(i: int | str) -> int | str:
    """A Qdrant point id: an unsigned int (numpy's too), or a UUID string as given."""
    return int(i) if isinstance(i, (int, np.integer)) else i


def _vectors(latents: np.ndarray, weights: np.ndarray) -> list[models.SparseVector]:
    """One Qdrant sparse vector per row of (n, m) latents and float32 weights: non-zero weights only, latents ascending."""
    out = []
    for idx, val in zip(latents, weights, strict=True):
        keep = val != 0
        order = np.argsort(idx[keep])
        out.append(models.SparseVector(indices=idx[keep][order].tolist(), values=val[keep][order].tolist()))
    return out


def export_codes(
    codes: SparseCodes,
    client: QdrantClient,
    collection: str,
    *,
    ids: Sequence[int | str] | None = None,
    payloads: Sequence[Mapping[str, Any] | None] | None = None,
    batch_size: int = 1024,
    metric: str = "ip",
    progress: bool | None = None,
    overwrite: bool = False,
) -> None:
    """Write (n, k) codes as points of a new collection `collection`, in batches of `batch_size`.

    ids: n point ids (unsigned ints or UUID strings), default 0 .. n-1; payloads: n dicts (e.g. the
    text) or None. metric "cosine" stores each code divided by its L2 norm, since Qdrant scores
    sparse vectors by dot product; query with `search_codes(..., metric="cosine")`. Shows a progress
    bar when there is more than one batch (`progress=None`) or when asked. An existing collection is
    an `InputError` unless overwrite=True, which deletes and recreates it; so are codes the index
    refuses (see `InvertedIndex.build`) and ids or payloads of a length other than n.
    """
    ids, weights = export_rows(codes, metric, batch_size, ids, payloads, id_of=_point_id)  # checked before touching the collection
    n = len(codes)
    vectors = _vectors(codes.indices, weights.astype(np.float32))
    if client.collection_exists(collection):
        if not overwrite:
            raise InputError(f"Qdrant collection {collection!r} already exists; pass overwrite=True to replace it or choose another name")
        client.delete_collection(collection)
    extra = {}
    if "metadata" in inspect.signature(client.create_collection).parameters:  # qdrant-client >= 1.16
        extra["metadata"] = {"csrv2": {"dim": codes.dim, "metric": metric}}
    client.create_collection(collection, sparse_vectors_config={VECTOR: models.SparseVectorParams()}, **extra)
    starts = range(0, n, batch_size)
    show = len(starts) > 1 if progress is None else progress
    for start in tqdm(starts, desc="qdrant export", unit="batch", disable=not show):
        points = [
            models.PointStruct(id=ids[i], vector={VECTOR: vectors[i]}, payload=None if payloads is None else payloads[i])
            for i in range(start, min(start + batch_size, n))
        ]
        client.upsert(collection, points, wait=True)


def search_codes(
    client: QdrantClient, collection: str, queries: SparseCodes | np.ndarray, top_n: int, metric: str = "ip", *, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-n from Qdrant: ids (q, top_n) int64 and scores (q, top_n) float32 for (q, k) query codes of
    any k, or dense (q, dim) rows (`head.project`), as `InvertedIndex.search` takes them.

    Like `InvertedIndex.search`: rows by score descending, only points sharing a latent with the query,
    padded with id -1 and score -inf. Pass the metric the collection was exported with ("cosine"
    L2-normalises the queries); ties may come in Qdrant's order rather than by smaller id. Queries go
    `batch_size` per request. `InputError` on a missing collection, a dim or metric other than the
    collection's metadata, or non-integer point ids; `ValueError` if top_n < 1.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    if not client.collection_exists(collection):
        raise InputError(f"Qdrant collection {collection!r} does not exist; write it with csrv2.search.qdrant.export_codes")
    meta = (getattr(client.get_collection(collection).config, "metadata", None) or {}).get("csrv2", {})
    dim = queries.dim if isinstance(queries, SparseCodes) else np.shape(queries)[-1]
    if meta.get("dim", dim) != dim:
        raise InputError(f"queries have dim {dim} but collection {collection!r} has dim {meta['dim']}; "
                         "encode queries with the head that encoded it")
    if meta.get("metric", metric) != metric:
        raise InputError(f"collection {collection!r} was exported with metric={meta['metric']!r}; search it with that metric")
    vectors = _vectors(*query_weights(queries, dim, metric, top_n))
    ids = np.full((len(queries), top_n), -1, dtype=np.int64)
    scores = np.full((len(queries), top_n), -np.inf, dtype=np.float32)
    for start in range(0, len(queries), batch_size):
        batch = vectors[start : start + batch_size]
        requests = [models.QueryRequest(query=v, using=VECTOR, limit=top_n, with_payload=False) for v in batch]
        for r, response in enumerate(client.query_batch_points(collection, requests), start):
            hits = response.points
            if any(not isinstance(p.id, int) for p in hits):
                raise InputError(f"collection {collection!r} has UUID point ids, which int64 ids cannot hold; use client.query_points")
            ids[r, : len(hits)] = [p.id for p in hits]
            scores[r, : len(hits)] = [p.score for p in hits]
    return ids, scores
