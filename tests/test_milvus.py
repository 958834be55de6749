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
from csrv2.search.milvus import PAYLOAD, VECTOR, export_codes, search_codes  # noqa: E402
from engine_contract import check_matches_inverted_index, check_wide_and_dense_queries, random_codes, subset  # noqa: E402


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
    check_matches_inverted_index(export_codes, search_codes, client, k, metric)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_wide_and_dense_queries_match_brute_force(client, metric):
    check_wide_and_dense_queries(export_codes, search_codes, client, metric)


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
    with pytest.raises(InputError, match="ids repeat"):
        export_codes(codes, client, "c", ids=[1, 2, 3, 4, 5, 6, 7, 8, 9, 1])
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
