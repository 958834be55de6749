"""csrv2.eval.metrics: each metric against a value worked out by hand, dense vs scipy-sparse inputs, and the
chunked paths against naive references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse

import csrv2.eval.metrics as metrics
from csrv2.codes import SparseCodes
from csrv2.errors import InputError
from csrv2.eval.metrics import (
    code_stats,
    dense_bytes_per_vector,
    logistic_regression_accuracy,
    nearest_neighbour_accuracy,
    retrieval_metrics,
    spearman,
    v_measure,
)

pytest.importorskip("sklearn")


def both(x: np.ndarray) -> list:
    """The same (n, dim) representation dense and as a scipy CSR matrix."""
    return [np.asarray(x, dtype=np.float32), scipy.sparse.csr_matrix(np.asarray(x, dtype=np.float32))]


# --- logistic regression ---------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_logistic_regression_on_a_symmetric_line(sparse):
    # Train points -2, -1 (class "neg") and 1, 2 ("pos") are symmetric about 0, so the fitted intercept
    # is 0 and the decision is the sign of x. Test -3 -> neg (right), 3 -> pos (right), 0.5 -> pos
    # (right), -0.5 -> neg (labelled pos: wrong): accuracy 3/4.
    train = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    test = np.array([[-3.0], [3.0], [0.5], [-0.5]])
    train_x, test_x = both(train)[sparse], both(test)[sparse]
    acc = logistic_regression_accuracy(train_x, ["neg", "neg", "pos", "pos"], test_x, ["neg", "pos", "pos", "pos"])
    assert acc == 0.75


def test_logistic_regression_rejects_misaligned_labels():
    with pytest.raises(InputError, match="labels"):
        logistic_regression_accuracy(np.ones((3, 2)), [0, 1], np.ones((1, 2)), [0])


# --- 1-nearest neighbour ---------------------------------------------------------------------------

TRAIN = np.array([[1, 0], [0, 1], [1, 0], [1, 1], [0, 0]], dtype=np.float32)
TRAIN_LABELS = np.array(["a", "b", "c", "d", "e"])


@pytest.mark.parametrize("sparse", [False, True])
def test_nearest_neighbour_by_hand(sparse):
    # cosines with train rows 0..4 = [1,0], [0,1], [1,0], [1,1], [0,0]:
    #   [2, 0]  -> 1, 0, 1, .71, 0     tie of rows 0 and 2: the lowest index, 0 -> "a" (labelled a: right)
    #   [0, 0]  -> 0 with everything   tie of all rows: row 0 -> "a"              (labelled a: right)
    #   [1, 2]  -> .45, .89, .45, .95  row 3 -> "d"                               (labelled d: right)
    #   [-1, 0] -> -1, 0, -1, -.71, 0  rows 1 and 4 (zero row) tie at 0: row 1 -> "b" (labelled e: wrong)
    # accuracy 3/4
    test = np.array([[2, 0], [0, 0], [1, 2], [-1, 0]])
    train_x, test_x = both(TRAIN)[sparse], both(test)[sparse]
    assert nearest_neighbour_accuracy(train_x, TRAIN_LABELS, test_x, ["a", "a", "d", "e"]) == 0.75


def test_nearest_neighbour_matches_a_naive_reference_across_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(40, 6)), rng.normal(size=(23, 6))
    train_y, test_y = rng.integers(0, 3, 40), rng.integers(0, 3, 23)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    expected = float((train_y[(unit(test) @ unit(train).T).argmax(axis=1)] == test_y).mean())
    monkeypatch.setattr(metrics, "CHUNK", 5)
    for train_x, test_x in zip(both(train), both(test)):
        assert nearest_neighbour_accuracy(train_x, train_y, test_x, test_y) == pytest.approx(expected)


# --- V-measure -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_v_measure_is_one_for_separated_clusters_with_zero_rows(sparse):
    # After normalisation the rows sit at exactly three points, (1, 0), (0, 1) and the zero rows at
    # (0, 0), one per label: k-means with 3 clusters recovers the labels, V = 1. (A NaN from dividing a
    # zero row by its norm would break k-means.)
    x = np.array([[1, 0], [5, 0], [0, 2], [0, 1], [0, 0], [0, 0]])
    assert v_measure(both(x)[sparse], [0, 0, 1, 1, 2, 2]) == pytest.approx(1.0)


@pytest.mark.parametrize("sparse", [False, True])
def test_v_measure_by_hand(sparse):
    # Rows normalise to (1,0), (1,0), (0,1), (0,1): 2 labels -> k-means finds clusters C = A A B B,
    # against classes K = 0 0 0 1. In bits:
    #   H(K) = H(3/4, 1/4) = 0.811278;  H(K|C) = 1/2 * 0 + 1/2 * H(1/2, 1/2) = 0.5
    #   homogeneity h = 1 - 0.5 / 0.811278 = 0.383689
    #   H(C) = 1;  H(C|K) = 3/4 * H(2/3, 1/3) + 1/4 * 0 = 3/4 * 0.918296 = 0.688722
    #   completeness c = 1 - 0.688722 = 0.311278
    #   V = 2 h c / (h + c) = 0.238868 / 0.694967 = 0.343711
    x = np.array([[2, 0], [1, 0], [0, 3], [0, 1]])
    h = 1 - 0.5 / (-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    c = 1 - 0.75 * -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert 2 * h * c / (h + c) == pytest.approx(0.343711, abs=1e-6)
    assert v_measure(both(x)[sparse], [0, 0, 0, 1]) == pytest.approx(0.343711, abs=1e-6)


def test_v_measure_is_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    x, labels = rng.normal(size=(60, 5)), rng.integers(0, 4, 60)
    assert v_measure(x, labels, seed=3) == v_measure(x, labels, seed=3)


# --- retrieval -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_retrieval_ranks_with_ties(sparse):
    # documents d0 = d1 = e0, d2 = e1, d3 = e2; query i's relevant document is d_i.
    #   q0 = e0:     d0 1, d1 1, d2 0, d3 0        -> d0 rank 1
    #   q1 = e0:     d1 ties d0 (lower id first)   -> d1 rank 2
    #   q2 = e0+e1:  d0, d1, d2 all 1/sqrt2        -> d2 rank 3 (after d0, d1)
    #   q3 = e2:     d3 1, the rest 0              -> d3 rank 1
    # top 2: nDCG = (1 + 1/log2(3) + 0 + 1) / 4 = 0.657732, recall = 3/4
    queries = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]])
    documents = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    q, d = both(queries)[sparse], both(documents)[sparse]
    assert retrieval_metrics(q, d, top=2) == pytest.approx({"ndcg@2": 0.657732, "recall@2": 0.75}, abs=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_retrieval_ndcg_at_ranks_1_2_and_11(sparse):
    # 3 queries over 13 documents: d0 = e1, d1 = e1 + e2, d2 = e2, d3 .. d12 = e0 (ten of them).
    #   q0 = e0: d3 .. d12 score 1 > d0's 0           -> d0 rank 11
    #   q1 = e1: d0 scores 1 > d1's 1/sqrt2           -> d1 rank 2
    #   q2 = e2: d2 scores 1, d1 1/sqrt2, the rest 0  -> d2 rank 1
    # top 10: nDCG = (0 + 1/log2(3) + 1) / 3 = 0.543643, recall 2/3
    # top 11: nDCG = (1/log2(12) + 1/log2(3) + 1) / 3 = 0.636624, recall 1
    documents = np.array([[0, 1, 0], [0, 1, 1], [0, 0, 1]] + [[1, 0, 0]] * 10)
    queries = np.eye(3)
    q, d = both(queries)[sparse], both(documents)[sparse]
    assert retrieval_metrics(q, d) == pytest.approx({"ndcg@10": 0.543643, "recall@10": 2 / 3}, abs=1e-6)
    assert retrieval_metrics(q, d, top=11) == pytest.approx({"ndcg@11": 0.636624, "recall@11": 1.0}, abs=1e-6)


def test_retrieval_zero_query_ties_everything():
    # documents e0, e1, e2; queries e0, e1 (rank 1 each) and a zero query, which scores 0 with every
    # document, so its d2 ranks after d0 and d1: rank 3.
    # top 2: nDCG = (1 + 1 + 0) / 3, recall 2/3;  top 3: nDCG = (1 + 1 + 1/log2(4)) / 3 = 5/6, recall 1
    queries = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert retrieval_metrics(queries, np.eye(3), top=2) == pytest.approx({"ndcg@2": 2 / 3, "recall@2": 2 / 3})
    assert retrieval_metrics(queries, np.eye(3), top=3) == pytest.approx({"ndcg@3": 5 / 6, "recall@3": 1.0})


def test_retrieval_matches_a_naive_reference_across_chunks(monkeypatch):
    rng = np.random.default_rng(2)
    queries, documents = rng.normal(size=(37, 8)), rng.normal(size=(50, 8))
    documents[:37] += 1.5 * queries  # make the relevant document likely, not certain, to rank high
    documents[40] = documents[3]  # an exact tie, for the id order
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(queries) @ unit(documents).T
    ranks = np.array([1 + list(np.lexsort((np.arange(50), -sims[i]))).index(i) for i in range(37)])
    expected = {"ndcg@5": float(np.where(ranks <= 5, 1 / np.log2(ranks + 1), 0).mean()), "recall@5": float((ranks <= 5).mean())}
    monkeypatch.setattr(metrics, "CHUNK", 8)
    for q, d in zip(both(queries), both(documents)):
        assert retrieval_metrics(q, d, top=5) == pytest.approx(expected)


def test_retrieval_rejects_more_queries_than_documents_and_other_dims():
    with pytest.raises(InputError, match="documents"):
        retrieval_metrics(np.ones((3, 2)), np.ones((2, 2)))
    with pytest.raises(InputError, match="dim"):
        retrieval_metrics(np.ones((2, 2)), np.ones((2, 3)))


# --- Spearman --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_spearman_by_hand(sparse):
    # x0 = x1 = (1,0), x2 = (0,1), x3 = (1,1). Pairs and their cosines:
    #   (0,1) 1, (0,2) 0, (0,3) 1/sqrt2, (2,3) 1/sqrt2, (1,2) 0
    #   ranks, ties averaged:  5, 1.5, 3.5, 3.5, 1.5   (mean 3, deviations 2, -1.5, .5, .5, -1.5)
    # gold 4, 1, 2, 3, .5 -> ranks 5, 2, 3, 4, 1      (mean 3, deviations 2, -1, 0, 1, -2)
    #   rho = sum(products) / sqrt(sum sq * sum sq) = 9 / sqrt(9 * 10) = 3 / sqrt(10) = 0.948683
    x = np.array([[1, 0], [1, 0], [0, 1], [1, 1]])
    pairs = np.array([[0, 1], [0, 2], [0, 3], [2, 3], [1, 2]])
    assert spearman(both(x)[sparse], pairs, [4.0, 1.0, 2.0, 3.0, 0.5]) == pytest.approx(3 / math.sqrt(10))


def test_spearman_zero_row_has_cosine_zero():
    # x2 is zero: pair (0,2) has cosine 0, between (0,1)'s -1 and (0,3)'s 1, so it matches gold 1, 2, 3.
    x = np.array([[1, 0], [-1, 0], [0, 0], [2, 0]])
    assert spearman(x, [[0, 1], [0, 2], [0, 3]], [1, 2, 3]) == pytest.approx(1.0)


# --- dense and sparse agree ------------------------------------------------------------------------


def test_dense_and_sparse_inputs_give_the_same_scores():
    rng = np.random.default_rng(3)
    centres = 3 * np.eye(4, 12)
    labels = rng.integers(0, 4, 80)
    x = np.maximum(centres[labels] + rng.normal(size=(80, 12)), 0)
    x[rng.random(x.shape) < 0.5] = 0  # sparse-looking codes, some rows possibly all zero
    dense, sparse = both(x)
    tr, te = slice(0, 60), slice(60, 80)
    assert logistic_regression_accuracy(dense[tr], labels[tr], dense[te], labels[te]) == pytest.approx(
        logistic_regression_accuracy(sparse[tr], labels[tr], sparse[te], labels[te]))
    assert nearest_neighbour_accuracy(dense[tr], labels[tr], dense[te], labels[te]) == \
        nearest_neighbour_accuracy(sparse[tr], labels[tr], sparse[te], labels[te])
    assert v_measure(dense, labels) == pytest.approx(v_measure(sparse, labels))
    assert retrieval_metrics(dense[:30], dense[30:]) == pytest.approx(retrieval_metrics(sparse[:30], sparse[30:]))
    pairs, gold = rng.integers(0, 80, (50, 2)), rng.random(50)
    assert spearman(dense, pairs, gold) == pytest.approx(spearman(sparse, pairs, gold))


# --- code statistics -------------------------------------------------------------------------------


def test_code_stats_by_hand():
    # dim 6, k 2. Non-zero values: row 0 latents 0 and 1, row 1 latent 1 (latent 2 holds a 0),
    # row 2 none (both slots 0). active_dims = (2 + 1 + 0) / 3 = 1.
    # Latents ever non-zero: {0, 1}, so 4 of 6 are dead: 66.67 %.
    # Index bytes per code: 3 non-zero values x 5 bytes over 3 codes = 5 (the shared offsets not counted).
    codes = SparseCodes(
        np.array([[0, 1], [1, 2], [3, 0]], dtype=np.int32), np.array([[2, 1], [3, 0], [0, 0]], dtype=np.float32), 6
    )
    assert code_stats(codes) == pytest.approx({"active_dims": 1.0, "dead_latents_pct": 400 / 6, "bytes_per_vector": 5.0})


def test_dense_bytes_per_vector():
    assert dense_bytes_per_vector(384) == 1536.0
    assert dense_bytes_per_vector(384, np.float16) == 768.0
