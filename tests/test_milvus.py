"""csrv2.search.milvus: export to Milvus Lite (a .db file), search it against InvertedIndex, collections and bad input."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest

pymilvus = pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from csrv2.codes import SparseCodes  # noqa: E402
from csrv2.errors import InputError  # noqa: E402
from csrv2.search.index import InvertedIndex  # noqa: E402
from csrv2.search.milvus import PAYLOAD, VECTOR, export_codes, search_codes  # noqa: E402


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

    The index stores float16 values and Milvus float32, so only such rows must rank identically in both.
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


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One Milvus Lite for the module (it takes seconds to start); each test drops its collections."""
    c = pymilvus.MilvusClient(str(tmp_path_factory.mktemp("milvus") / "codes.db"))
    yield c
    c.close()


@pytest.fixture(autouse=True)
def clean(client):
    yield
    for name in client.list_collections():
        client.drop_collection(name)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("k", [2, 8])
def test_search_matches_inverted_index(client, k, metric):
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


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_wide_and_dense_queries_match_brute_force(client, metric):
    """Asymmetric search through Milvus: query codes wider than the documents', and dense signed rows (the shifted path)."""
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


def test_zero_slots_dropped_and_cosine_normalised(client):
    codes = SparseCodes(np.array([[7, 2, 5, 0]], np.int32), np.array([[3.0, 4.0, 0.0, 0.0]], np.float32), 8)
    export_codes(codes, client, "ip")
    export_codes(codes, client, "cos", metric="cosine")
    (ip,) = client.get("ip", ids=[0], output_fields=[VECTOR])
    (cos,) = client.get("cos", ids=[0], output_fields=[VECTOR])
    assert sorted(ip[VECTOR]) == sorted(cos[VECTOR]) == [2, 7, 8]  # latent 8 = dim: the offset for signed queries
    np.testing.assert_allclose([ip[VECTOR][2], ip[VECTOR][7], ip[VECTOR][8]], [4.0, 3.0, 1.0])  # offset 8, minus the sum 7
    np.testing.assert_allclose([cos[VECTOR][2], cos[VECTOR][7]], [0.8, 0.6], rtol=1e-6)  # divided by the norm, 5


def test_empty_query_is_all_padding(client):
    codes = random_codes(50, 32, 2, seed=0)
    export_codes(codes, client, "c")
    empty = SparseCodes(np.array([[3, 4]], np.int32), np.zeros((1, 2), np.float32), 32)
    ids, scores = search_codes(client, "c", empty, 5)
    assert (ids == -1).all() and np.isneginf(scores).all()
    ids, _ = search_codes(client, "c", np.zeros((2, 32), np.float32), 5)
    assert (ids == -1).all()


def test_existing_collection_refused_then_replaced(client):
    export_codes(random_codes(10, 32, 2, seed=0), client, "c")
    with pytest.raises(InputError, match=r"'c' already exists; pass overwrite=True"):
        export_codes(random_codes(5, 32, 2, seed=1), client, "c")
    assert client.get_collection_stats("c")["row_count"] == 10  # untouched by the refusal
    export_codes(random_codes(5, 32, 2, seed=1), client, "c", overwrite=True)
    assert client.get_collection_stats("c")["row_count"] == 5


def test_ids_and_payloads_round_trip(client):
    codes = random_codes(20, 32, 2, seed=3, zero_frac=0.0)
    ids = np.arange(100, 120)
    payloads = [{"text": f"doc {i}"} for i in range(19)] + [None]
    export_codes(codes, client, "c", ids=ids, payloads=payloads, batch_size=7, progress=False)
    got = client.get("c", ids=[100, 119], output_fields=[PAYLOAD])
    assert {e["id"]: e[PAYLOAD] for e in got} == {100: {"text": "doc 0"}, 119: {}}  # None is stored as {}
    found, _ = search_codes(client, "c", subset(codes, np.array([4])), 1)
    assert found[0, 0] == 104  # a code's own entity scores highest: its values are all positive


def test_bad_input(client):
    codes = random_codes(10, 32, 2, seed=0)
    with pytest.raises(InputError, match="3 ids for 10 codes"):
        export_codes(codes, client, "c", ids=[1, 2, 3])
    with pytest.raises(InputError, match="2 payloads for 10 codes"):
        export_codes(codes, client, "c", payloads=[{}, {}])
    with pytest.raises(InputError, match="row 0 has a negative"):
        export_codes(SparseCodes(codes.indices, -codes.values, 32), client, "c")
    assert not client.has_collection("c")  # checked before creating anything
    with pytest.raises(InputError, match="does not exist"):
        search_codes(client, "c", codes, 3)
    with pytest.raises(ValueError, match="metric"):
        export_codes(codes, client, "c", metric="l2")
    export_codes(codes, client, "c")
    with pytest.raises(ValueError, match="top_n"):
        search_codes(client, "c", codes, 0)
    with pytest.raises(InputError, match="dense queries must be"):
        search_codes(client, "c", np.zeros((2, 32), np.int64), 3)


def test_metadata_checked(client):
    export_codes(random_codes(10, 32, 2, seed=0), client, "c", metric="cosine")
    meta = json.loads(client.describe_collection("c")["description"])
    assert meta["csrv2"]["dim"] == 32 and meta["csrv2"]["metric"] == "cosine"
    with pytest.raises(InputError, match="metric='cosine'"):
        search_codes(client, "c", random_codes(2, 32, 2, seed=1), 3)
    with pytest.raises(InputError, match="dim 64"):
        search_codes(client, "c", random_codes(2, 64, 2, seed=1), 3, metric="cosine")
    with pytest.raises(InputError, match="dim 64"):
        search_codes(client, "c", np.ones((2, 64), np.float32), 3, metric="cosine")


def test_missing_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # makes `import pymilvus` raise ImportError
    monkeypatch.delitem(sys.modules, "csrv2.search.milvus")
    with pytest.raises(ImportError, match=r'pip install "csrv2\[milvus\]"'):
        importlib.import_module("csrv2.search.milvus")
