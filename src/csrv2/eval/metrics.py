"""Evaluation metrics as pure functions: representations and labels in, a float out; no I/O.

A representation `x` is a dense (n, dim) array or a scipy.sparse (n, dim) matrix (codes come in as
`codes.to_scipy()`); every function accepts both and keeps sparse input sparse. Similarity is cosine
throughout, computed in float64 on L2-normalised rows; an all-zero row stays zero, so it has cosine 0
with everything. Similarity matrices are built `CHUNK` query rows at a time, so 10k x 10k needs about
CHUNK x 10k x 8 bytes at once, not 800 MB.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse
import scipy.stats

from ..codes import SparseCodes
from ..errors import InputError
from ..search.index import POSTING_BYTES

CHUNK = 1024  # query rows per block of similarities
# A cap, not a cost: lbfgs converged in 17-32 iterations on 1.7k MiniLM (384-d) BBC rows and on their
# 1536-d codes at k = 8 and 32, also with values scaled x20; MTEB's own classifier uses 100.
LOGISTIC_MAX_ITER = 1000


def _unit_rows(x):
    """x: (n, dim) dense or sparse -> (n, dim) float64 rows divided by their L2 norm; zero rows stay zero.

    Dense stays a dense ndarray, sparse becomes CSR with the same non-zero pattern.
    """
    if scipy.sparse.issparse(x):
        x = scipy.sparse.csr_matrix(x, dtype=np.float64)
        norm = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
        return scipy.sparse.csr_matrix(scipy.sparse.diags(inv) @ x)
    x = np.asarray(x, dtype=np.float64)
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _cosine_rows(queries, documents) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, sims) with sims (c, n_documents) float64 = cosine of queries[start:start+c] with every document."""
    if queries.shape[1] != documents.shape[1]:
        raise InputError(f"queries have dim {queries.shape[1]} but documents have dim {documents.shape[1]}; represent both the same way")
    q, d_t = _unit_rows(queries), _unit_rows(documents).T
    for start in range(0, q.shape[0], CHUNK):
        sims = q[start : start + CHUNK] @ d_t
        yield start, sims.toarray() if scipy.sparse.issparse(sims) else np.asarray(sims)


def _sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ImportError("this metric needs scikit-learn: pip install scikit-learn") from e


def _check_labels(x, y, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (x.shape[0],):
        raise InputError(f"{what} has {x.shape[0]} rows but its labels have shape {y.shape}; pass one label per row")
    return y


def logistic_regression_accuracy(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """Accuracy on (n_test, dim) test_x of a logistic regression fitted on (n_train, dim) train_x.

    As MTEB's classification scores embeddings (sklearn's LogisticRegression: lbfgs, L2, C=1, fitted on
    the whole train split), but on L2-normalised rows and with max_iter=LOGISTIC_MAX_ITER (1000). MTEB
    feeds raw vectors, which for unit-norm backbones such as MiniLM is the same; normalising keeps a
    truncation or a sparse code, whose raw values can be far smaller, from being regularised to a constant.
    train_y: (n_train,), test_y: (n_test,) labels of any comparable type.
    """
    _sklearn()
    from sklearn.linear_model import LogisticRegression

    train_y, test_y = _check_labels(train_x, train_y, "train_x"), _check_labels(test_x, test_y, "test_x")
    model = LogisticRegression(max_iter=LOGISTIC_MAX_ITER, random_state=seed)
    model.fit(_unit_rows(train_x), train_y)
    return float((model.predict(_unit_rows(test_x)) == test_y).mean())


def nearest_neighbour_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Top-1 accuracy of 1-nearest-neighbour by cosine: each test row takes the label of its most similar train row.

    train_x: (n_train, dim), train_y: (n_train,), test_x: (n_test, dim), test_y: (n_test,).
    Ties (exactly equal cosines) go to the lowest train index; a zero test row has cosine 0 with every
    train row, so it takes train row 0's label.
    """
    train_y, test_y = _check_labels(train_x, train_y, "train_x"), _check_labels(test_x, test_y, "test_x")
    nearest = np.empty(test_x.shape[0], dtype=np.int64)
    for start, sims in _cosine_rows(test_x, train_x):
        nearest[start : start + len(sims)] = sims.argmax(axis=1)  # argmax returns the first maximum
    return float((train_y[nearest] == test_y).mean())


def v_measure(x, labels, seed: int = 0) -> float:
    """V-measure of k-means clusters of (n, dim) x against (n,) labels.

    k-means (sklearn KMeans, k-means++ init, n_init=10, random_state=seed) with one cluster per distinct
    label, on L2-normalised rows (zero rows stay zero); deterministic for a given seed. (MTEB instead
    averages MiniBatchKMeans, n_init=1, over bootstrap samples of the raw vectors.)
    """
    _sklearn()
    from sklearn.cluster import KMeans
    from sklearn.metrics import v_measure_score

    labels = _check_labels(x, labels, "x")
    kmeans = KMeans(n_clusters=len(np.unique(labels)), n_init=10, random_state=seed)
    return float(v_measure_score(labels, kmeans.fit_predict(_unit_rows(x))))


def retrieval_metrics(query_x, document_x, top: int = 10) -> dict[str, float]:
    """nDCG@top and recall@top when query i's one relevant document is document i.

    query_x: (q, dim), document_x: (n, dim) with n >= q (documents past q are distractors).
    Documents are ranked by cosine, descending, ties by document id ascending, so the rank of document i
    for query i is 1 + #{j: s_j > s_i} + #{j < i: s_j == s_i}. With one relevant document the ideal DCG
    is 1, so nDCG@top = mean of 1 / log2(rank + 1) over queries with rank <= top (0 otherwise), and
    recall@top = fraction of queries with rank <= top.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if query_x.shape[0] > document_x.shape[0]:
        raise InputError(f"{query_x.shape[0]} queries but only {document_x.shape[0]} documents; query i's relevant document is document i")
    ranks = np.empty(query_x.shape[0], dtype=np.int64)
    for start, sims in _cosine_rows(query_x, document_x):
        rows = np.arange(len(sims))
        relevant = start + rows
        own = sims[rows, relevant][:, None]  # (c, 1)
        before = np.arange(sims.shape[1])[None, :] < relevant[:, None]  # (c, n): document ids below the relevant one
        ranks[start : start + len(sims)] = 1 + (sims > own).sum(axis=1) + ((sims == own) & before).sum(axis=1)
    hit = ranks <= top
    return {
        f"ndcg@{top}": float(np.where(hit, 1.0 / np.log2(ranks + 1), 0.0).mean()),
        f"recall@{top}": float(hit.mean()),
    }


def spearman(x, pairs, gold) -> float:
    """Spearman correlation between the cosines of row pairs of (n, dim) x and gold (m,) scores.

    pairs: (m, 2) row indices into x. scipy.stats.spearmanr: tied values get their average rank;
    NaN when either side is constant.
    """
    pairs, gold = np.asarray(pairs), np.asarray(gold, dtype=np.float64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or gold.shape != (len(pairs),):
        raise InputError(f"pairs must be (m, 2) and gold (m,), got {pairs.shape} and {gold.shape}")
    u = _unit_rows(x)
    a, b = u[pairs[:, 0]], u[pairs[:, 1]]
    cos = np.asarray(a.multiply(b).sum(axis=1)).ravel() if scipy.sparse.issparse(u) else (a * b).sum(axis=1)
    return float(scipy.stats.spearmanr(cos, gold).statistic)


def code_stats(codes: SparseCodes) -> dict[str, float]:
    """Size and use of (n, k) codes over `dim` latents.

    active_dims: mean number of non-zero values per code; dead_latents_pct: % of the dim latents
    non-zero in no code here; bytes_per_vector: what an `InvertedIndex` stores per code (a 3-byte id
    and a float16 value per non-zero, POSTING_BYTES each), without the index's 8 (dim + 1) bytes of
    posting offsets, which all codes share and which would otherwise swamp the figure on a small set.
    """
    nonzero = codes.values != 0
    used = np.zeros(codes.dim, dtype=bool)
    used[codes.indices[nonzero]] = True
    return {
        "active_dims": float(codes.nnz_per_row().mean()) if len(codes) else 0.0,
        "dead_latents_pct": 100.0 * float((~used).mean()),
        "bytes_per_vector": POSTING_BYTES * float(nonzero.sum()) / len(codes) if len(codes) else float("nan"),
    }


def dense_bytes_per_vector(dim: int, dtype=np.float32) -> float:
    """Bytes of one dense vector of `dim` values of `dtype` (4 dim for float32)."""
    return float(dim * np.dtype(dtype).itemsize)


__all__ = [
    "code_stats",
    "dense_bytes_per_vector",
    "logistic_regression_accuracy",
    "nearest_neighbour_accuracy",
    "retrieval_metrics",
    "spearman",
    "v_measure",
]
