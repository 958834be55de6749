"""Export `SparseCodes` to a Milvus collection and search it there: the same exact top-n as `InvertedIndex`,
served by Milvus (Milvus Lite in a local file via `MilvusClient("codes.db")`, or a server or cluster via
`MilvusClient(uri="http://host:19530")`).

A collection has an INT64 primary key `id`, one SPARSE_FLOAT_VECTOR field, `VECTOR`, and a JSON field,
`PAYLOAD`, for the payloads (a plain JSON field rather than dynamic fields, so a payload's keys cannot clash
with the schema's; Milvus Lite has no nullable fields, so a missing payload is stored as {}). Each entity is
one code with its unused (zero) slots dropped. Milvus scores sparse vectors by inner product only (metric
"IP"; it has no cosine for them), so metric "cosine" stores (and queries with) each code divided by its L2
norm. The csrv2 settings are kept as JSON in the collection's description,
{"csrv2": {"dim": ..., "metric": ..., "offset": ...}} (Milvus Lite keeps no collection properties), and
`search_codes` checks them.

Milvus refuses negative values in sparse vectors, queries included, so a dense query with negative weights
(`head.project`'s rows) is shifted: every stored non-empty code also holds `offset - sum(code)` on an extra
latent, `dim`, where `offset` is 1 + the largest sum of a stored code; the query adds c = -min(row) to each
latent and puts c on latent `dim`, which adds exactly c * offset to every score, subtracted afterwards. Such
a query has every non-empty stored code as a candidate (the others score 0 against it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..codes import SparseCodes
from ..errors import InputError
from .index import METRICS, export_rows, query_weights

try:
    from pymilvus import DataType, MilvusClient, MilvusException
except ImportError as e:
    raise ImportError('csrv2.search.milvus needs pymilvus: pip install "csrv2[milvus]"') from e

VECTOR = "csrv2"  # the collection's one sparse vector field
PAYLOAD = "payload"  # the JSON field holding each entity's payload
# Exact search: drop no small values when building the index or searching it (0 is the default; stated so it stays).
SEARCH_PARAMS = {"metric_type": "IP", "params": {"drop_ratio_search": 0.0}}


def _vectors(latents: np.ndarray, weights: np.ndarray) -> list[dict[int, float]]:
    """One Milvus sparse vector ({latent: value}) per row of (n, m) latents and float32 weights: non-zero weights only."""
    return [dict(zip(idx[val != 0].tolist(), val[val != 0].tolist())) for idx, val in zip(latents, weights, strict=True)]


def _settings(client: MilvusClient, collection: str) -> dict[str, Any]:
    """The csrv2 settings kept in a collection's description, or {} for a collection csrv2 did not write.

    One request when the collection exists (a search pays for it: about 1 ms on Milvus Lite); `InputError` if it does not.
    """
    try:
        description = client.describe_collection(collection).get("description")
    except MilvusException:
        if client.has_collection(collection):
            raise
        raise InputError(f"Milvus collection {collection!r} does not exist; write it with csrv2.search.milvus.export_codes") from None
    try:
        meta = json.loads(description or "{}")
    except (TypeError, ValueError):
        return {}
    return meta.get("csrv2", {}) if isinstance(meta, dict) else {}


def export_codes(
    codes: SparseCodes,
    client: MilvusClient,
    collection: str,
    *,
    ids: Sequence[int] | None = None,
    payloads: Sequence[Mapping[str, Any] | None] | None = None,
    batch_size: int = 1024,
    metric: str = "ip",
    progress: bool | None = None,
    overwrite: bool = False,
) -> None:
    """Write (n, k) codes as entities of a new collection `collection`, in batches of `batch_size`.

    ids: n int64 primary keys, default 0 .. n-1; payloads: n JSON-serialisable dicts (e.g. the text) or None
    (stored as {}). metric "cosine" stores each code divided by its L2 norm, since Milvus scores sparse
    vectors by inner product; query with `search_codes(..., metric="cosine")`. Shows a progress bar when
    there is more than one batch (`progress=None`) or when asked. An existing collection is an `InputError`
    unless overwrite=True, which drops and recreates it; so are codes the index refuses (see
    `InvertedIndex.build`) and ids or payloads of a length other than n.
    """
    ids, weights = export_rows(codes, metric, batch_size, ids, payloads)  # (n, k) float64; checked before touching the collection
    n = len(codes)
    sums = weights.sum(axis=1)
    offset = float(np.float32(sums.max(initial=0.0) + 1.0))  # see the module docstring: room for signed dense queries
    latents = np.concatenate([codes.indices.astype(np.int64), np.full((n, 1), codes.dim, np.int64)], axis=1)
    rest = np.where(sums > 0, offset - sums, 0)[:, None]  # empty codes stay empty: never a candidate
    vectors = _vectors(latents, np.concatenate([weights, rest], axis=1).astype(np.float32))
    if client.has_collection(collection):
        if not overwrite:
            raise InputError(f"Milvus collection {collection!r} already exists; pass overwrite=True to replace it or choose another name")
        client.drop_collection(collection)
    settings = {"csrv2": {"dim": codes.dim, "metric": metric, "offset": offset}}
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=json.dumps(settings))
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field(VECTOR, DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field(PAYLOAD, DataType.JSON)
    index = client.prepare_index_params()
    # An inverted index scored by inner product, exact with drop_ratio_build 0 (SPARSE_WAND is deprecated in Milvus 2.5).
    index.add_index(VECTOR, index_type="SPARSE_INVERTED_INDEX", metric_type="IP", params={"drop_ratio_build": 0.0})
    client.create_collection(collection, schema=schema, index_params=index)
    starts = range(0, n, batch_size)
    show = len(starts) > 1 if progress is None else progress
    for start in tqdm(starts, desc="milvus export", unit="batch", disable=not show):
        rows = range(start, min(start + batch_size, n))
        given = [None] * len(rows) if payloads is None else payloads[start : rows.stop]
        client.insert(collection, [{"id": ids[i], VECTOR: vectors[i], PAYLOAD: dict(p or {})} for i, p in zip(rows, given)])
    # Set-up for speed and exactness (Milvus Lite 2.5.1, 100k k = 2 codes at h = 1536, 2 CPU cores; docs/benchmarks.md):
    # the collection is created with its index, so it is loaded and searchable as rows arrive (a growing segment: ~1-3 ms
    # a query straight after inserting, on the real engine; the ~1.6 s probe was not reproduced); flushing seals the rows into
    # segments with the sparse inverted index built and written to disk (Lite's file), at the same query speed. Releasing
    # and reloading after the flush gained nothing measurable and cost ~5 s at 100k, so it is not done. A collection
    # reopened from a Lite file starts released: its first search loads it (~5 s at 100k; load_collection pays it ahead).
    client.flush(collection)


def search_codes(
    client: MilvusClient, collection: str, queries: SparseCodes | np.ndarray, top_n: int, metric: str = "ip", *, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-n from Milvus: ids (q, top_n) int64 and scores (q, top_n) float32 for (q, k) query codes of
    any k, or dense (q, dim) rows of any sign (`head.project`), as `InvertedIndex.search` takes them.

    Like `InvertedIndex.search`: rows by score descending, only entities sharing a latent with the query
    (every non-empty one for a dense query with a negative weight), padded with id -1 and score -inf. Pass
    the metric the collection was exported with ("cosine" L2-normalises the queries); ties may come in
    Milvus's order rather than by smaller id. Queries go `batch_size` per request. A collection reopened from a Milvus
    Lite file is loaded by its first search (seconds); `client.load_collection(collection)` pays that ahead. `InputError` on a missing
    collection or a dim or metric other than the collection's settings; `ValueError` if top_n < 1.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    meta = _settings(client, collection)
    dim = queries.dim if isinstance(queries, SparseCodes) else np.shape(queries)[-1]
    if meta.get("dim", dim) != dim:
        raise InputError(f"queries have dim {dim} but collection {collection!r} has dim {meta['dim']}; "
                         "encode queries with the head that encoded it")
    if meta.get("metric", metric) != metric:
        raise InputError(f"collection {collection!r} was exported with metric={meta['metric']!r}; search it with that metric")
    latents, weights = query_weights(queries, dim, metric, top_n)
    shift = np.maximum(-weights.min(axis=1, initial=0.0), 0).astype(np.float32)  # (q,) c per row, 0 for non-negative rows
    if shift.any():
        if "offset" not in meta:
            raise InputError(f"collection {collection!r} has no csrv2 offset, so it cannot take queries with negative weights")
        latents = np.concatenate([latents, np.full((len(latents), 1), dim, np.int64)], axis=1)
        weights = np.concatenate([weights + shift[:, None], shift[:, None]], axis=1)
    vectors = _vectors(latents, weights)
    minus = shift.astype(np.float64) * meta.get("offset", 0.0)  # (q,) what the shift added to every score
    ids = np.full((len(queries), top_n), -1, dtype=np.int64)
    scores = np.full((len(queries), top_n), -np.inf, dtype=np.float32)
    for start in range(0, len(queries), batch_size):
        batch = vectors[start : start + batch_size]
        result = client.search(collection, batch, limit=top_n, anns_field=VECTOR, search_params=SEARCH_PARAMS)
        for r, hits in enumerate(result, start):
            ids[r, : len(hits)] = [h["id"] for h in hits]
            scores[r, : len(hits)] = np.array([h["distance"] for h in hits], np.float64) - minus[r]
    return ids, scores
