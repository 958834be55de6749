"""What every serving engine's export_codes / search_codes must do, checked the same way for each (Qdrant, Milvus):
the built-in index's top-10 for the same codes, and brute force for wide and dense (signed) queries."""

from __future__ import annotations

import numpy as np

from csrv2.codes import SparseCodes
from csrv2.search.index import InvertedIndex


def random_codes(n: int, dim: int, k: int, seed: int, zero_frac: float = 0.1) -> SparseCodes:
    """n codes with k distinct latents each, values in (0, 1], some slots zeroed."""
    rng = np.random.default_rng(seed)
    indices = np.argsort(rng.random((n, dim)), axis=1)[:, :k]  # k distinct latents per row
    values = 1.0 - rng.random((n, k))
    values[rng.random((n, k)) < zero_frac] = 0.0
    return SparseCodes(indices.astype(np.int32), values.astype(np.float32), dim)


def normalised(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def untied(codes: SparseCodes, queries: SparseCodes, metric: str, top_n: int, gap: float = 3e-3) -> np.ndarray:
    """Rows of `queries` whose best top_n + 1 exact scores differ pairwise by more than `gap` (relative).

    The index stores float16 values and the engines float32, so only such rows must rank identically in both.
    """
    x, q = codes.to_dense().astype(np.float64), queries.to_dense().astype(np.float64)
    if metric == "cosine":
        x, q = normalised(x), normalised(q)
    scores = q @ x.T  # (q, n)
    keep = []
    for r, row in enumerate(scores):
        best = np.sort(row[row > 0])[::-1][: top_n + 1]
        if (np.diff(best) < -gap * best[1:]).all():
            keep.append(r)
    return np.array(keep)


def subset(codes: SparseCodes, rows: np.ndarray) -> SparseCodes:
    return SparseCodes(codes.indices[rows], codes.values[rows], codes.dim)


def check_matches_inverted_index(export_codes, search_codes, client, k: int, metric: str) -> None:
    """2,000 codes exported in two batches: the untied queries get the built-in index's top-10, padding included."""
    codes = random_codes(2000, 1024, k, seed=k)
    pool = random_codes(60, 1024, k, seed=100 + k)
    rows = untied(codes, pool, metric, top_n=10)
    assert len(rows) >= 20
    queries = subset(pool, rows)
    export_codes(codes, client, "c", metric=metric, progress=False)  # two batches of 1024
    ids, scores = search_codes(client, "c", queries, 10, metric=metric)
    ref_ids, ref_scores = InvertedIndex.build(codes, metric).search(queries, 10)
    assert ids.shape == scores.shape == (len(queries), 10) and ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_ids)  # -1 padding included: at k = 2 most queries have < 10 candidates
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-3)  # -inf padding must match exactly
    if k == 2:
        assert (ids == -1).any()


def check_wide_and_dense_queries(export_codes, search_codes, client, metric: str) -> None:
    """Asymmetric search through an engine: query codes wider than the documents', and dense signed rows, against brute force."""
    codes = random_codes(1500, 256, 2, seed=0)
    export_codes(codes, client, "c", metric=metric, progress=False)
    stored = codes.to_dense().astype(np.float64)
    stored = normalised(stored) if metric == "cosine" else stored
    rng = np.random.default_rng(1)
    for queries in (random_codes(80, 256, 32, seed=2), rng.normal(size=(80, 256)).astype(np.float32)):
        ids, scores = search_codes(client, "c", queries, 5, metric=metric)
        q = queries.to_dense().astype(np.float64) if isinstance(queries, SparseCodes) else queries.astype(np.float64)
        want = (normalised(q) if metric == "cosine" else q) @ stored.T  # (80, 1500); every stored code has a non-zero here
        best = np.argsort(-want, axis=1)[:, :6]
        gaps = np.diff(np.take_along_axis(want, best, axis=1), axis=1)  # (80, 5), <= 0
        clear = (gaps < -1e-4).all(axis=1)
        assert clear.sum() >= 20
        np.testing.assert_array_equal(ids[clear], best[clear, :5])
        np.testing.assert_allclose(scores, np.take_along_axis(want, ids, axis=1), rtol=1e-4, atol=1e-5)
