"""The torch path of the index against the numpy path (run here on CPU; the same code runs on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from csrv2 import InputError, InvertedIndex, SparseCodes
from csrv2.search.torch_index import TorchIndex


def random_codes(n, dim, k, seed):
    rng = np.random.default_rng(seed)
    indices = np.argsort(rng.random((n, dim)), axis=1)[:, :k].astype(np.int32)  # distinct latents per row
    values = rng.uniform(0.1, 2.0, (n, k)).astype(np.float32)
    values[rng.random((n, k)) < 0.1] = 0  # some unused slots
    return SparseCodes(indices, values, dim)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_torch_search_equals_numpy_search(metric, k):
    codes, queries = random_codes(3000, 256, k, 0), random_codes(40, 256, k, 1)
    index = InvertedIndex.build(codes, metric)
    want_ids, want_scores = index.search(queries, 10)
    ids, scores = TorchIndex(index, "cpu").search(queries, 10, batch_size=16)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    # tied scores may come in another order: check each returned id's own score instead of the order
    dense = np.zeros((len(codes), 256))
    np.put_along_axis(dense, codes.indices.astype(np.int64), index_values(codes, metric), axis=1)
    query = np.zeros((len(queries), 256))
    np.put_along_axis(query, queries.indices.astype(np.int64), index_values(queries, metric, f16=False), axis=1)
    found = ids >= 0
    rows = np.nonzero(found)[0]
    np.testing.assert_allclose((dense[ids[found]] * query[rows]).sum(1), scores[found], rtol=1e-5)
    assert (found == (want_ids >= 0)).all()


def index_values(codes, metric, f16=True):
    """The values the index holds (float16, unit-norm rows for cosine), or a query's (float32)."""
    v = codes.values.astype(np.float64)
    if metric == "cosine":
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        v = np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)
    return v.astype(np.float16).astype(np.float64) if f16 else v.astype(np.float32).astype(np.float64)


def test_padding_and_bad_queries():
    codes = random_codes(5, 1000, 2, 0)
    index = TorchIndex(InvertedIndex.build(codes), "cpu")
    ids, scores = index.search(random_codes(3, 1000, 2, 7), 8)  # 5 vectors: 5 columns at most, few shared latents
    assert ids.shape == (3, 5) and ((ids == -1) == np.isneginf(scores)).all() and (ids == -1).any()
    ids, scores = index.search(codes, 10**12)  # uncapped: 12 TB of results
    assert ids.shape == scores.shape == (5, 5) and (ids[:, 0] == np.arange(5)).all()
    with pytest.raises(InputError, match="queries have dim 10 but the index has dim 1000"):
        index.search(random_codes(2, 10, 2, 0), 3)
    with pytest.raises(ValueError, match="top_n"):
        index.search(codes, 0)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_torch_dense_and_wide_queries_equal_numpy_search(metric):
    codes = random_codes(2000, 128, 2, 0)
    index = InvertedIndex.build(codes, metric)
    rng = np.random.default_rng(3)
    dense = rng.normal(size=(30, 128)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.3] = 0
    for queries in (dense, random_codes(30, 128, 32, 5)):
        want_ids, want_scores = index.search(queries, 10)
        ids, scores = TorchIndex(index, "cpu").search(queries, 10, batch_size=7)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
        assert ((ids >= 0) == (want_ids >= 0)).all()
