"""csrv2.search.index: InvertedIndex search against a brute-force dense reference, add, files and bad input."""

from __future__ import annotations

import importlib.util
import os
import zlib

import numpy as np
import pytest

import csrv2.atomic as atomic
import csrv2.search.index as index_module
from csrv2.codes import SparseCodes
from csrv2.errors import InputError
from csrv2.search.index import InvertedIndex, pack_ids, unpack_ids


def random_codes(n: int, dim: int, k: int, seed: int, levels=None, zero_frac: float = 0.1) -> SparseCodes:
    """n codes with k distinct latents each, values in (0, 1] (or drawn from `levels`), some slots zeroed."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, dim, (n, k))
    while (dup := (np.diff(np.sort(indices, axis=1), axis=1) == 0).any(axis=1)).any():
        indices[dup] = rng.integers(0, dim, (int(dup.sum()), k))  # redraw rows that repeat a latent
    values = rng.choice(levels, (n, k)) if levels is not None else 1.0 - rng.random((n, k))
    values[rng.random((n, k)) < zero_frac] = 0.0
    return SparseCodes(indices.astype(np.int32), values.astype(np.float32), dim)


def normalised(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def stored_dense(codes: SparseCodes, metric: str) -> np.ndarray:
    """(n, dim) float32 of what the index stores: rows L2-normalised for cosine, then rounded to float16."""
    x = codes.to_dense().astype(np.float64)
    return (normalised(x) if metric == "cosine" else x).astype(np.float16).astype(np.float32)


def query_dense(codes: SparseCodes, metric: str) -> np.ndarray:
    x = codes.to_dense().astype(np.float64)
    return (normalised(x) if metric == "cosine" else x).astype(np.float32)


def brute_force_search(index_codes_dense: np.ndarray, query_dense: np.ndarray, top_n: int):
    """Naive exact top-n over (n, dim) stored values for (q, dim) queries: ids (q, top_n), scores (q, top_n).

    Candidates are the vectors with a stored value on a latent the query weighs non-zero (of any sign); ties by smaller id; rows with
    fewer than top_n candidates padded with -1 / -inf.
    """
    x, q = index_codes_dense.astype(np.float64), query_dense.astype(np.float64)
    scores = (q @ x.T).astype(np.float32)  # (q, n); float16 x float32 products are exact in float64
    overlap = ((q != 0).astype(np.float64) @ (x > 0).T.astype(np.float64)) > 0  # (q, n)
    ids = np.full((len(q), top_n), -1, dtype=np.int64)
    out = np.full((len(q), top_n), -np.inf, dtype=np.float32)
    for r in range(len(q)):
        cand = np.flatnonzero(overlap[r])
        best = cand[np.lexsort((cand, -scores[r, cand]))][:top_n]
        ids[r, : len(best)], out[r, : len(best)] = best, scores[r, best]
    return ids, out


# Both search paths meet the same reference: numpy always, the numba kernel where numba is installed.
SEARCH_PATHS = [False] + ([True] if importlib.util.find_spec("numba") else [])


def assert_matches_reference(index: InvertedIndex, codes: SparseCodes, queries: SparseCodes | np.ndarray, top_n: int):
    width = min(top_n, len(codes))  # results are never wider than the index
    dense = query_dense(queries, index.metric) if isinstance(queries, SparseCodes) else \
        (normalised(queries.astype(np.float64)) if index.metric == "cosine" else queries).astype(np.float32)
    ref_ids, ref_scores = brute_force_search(stored_dense(codes, index.metric), dense, width)
    for compiled in SEARCH_PATHS:
        ids, scores = index.search(queries, top_n, compiled=compiled)
        assert ids.shape == scores.shape == (len(queries), width) and ids.dtype == np.int64 and scores.dtype == np.float32
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("k", [1, 2, 8, 64])
def test_search_matches_brute_force(k, metric):
    dim = 64 * k  # about 6 postings per latent at n = 400
    codes = random_codes(400, dim, k, seed=k)
    queries = random_codes(30, dim, k, seed=100 + k)
    index = InvertedIndex.build(codes, metric)
    for top_n in (1, 10, 400, 500):  # 500 > n: capped at n = 400, rows with fewer candidates padded
        assert_matches_reference(index, codes, queries, top_n)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("doc_k,query_k", [(1, 8), (2, 32), (8, 64)])
def test_queries_coded_at_a_larger_k_than_the_documents(doc_k, query_k, metric):
    dim = 256
    codes, queries = random_codes(500, dim, doc_k, seed=doc_k), random_codes(25, dim, query_k, seed=7 + query_k)
    index = InvertedIndex.build(codes, metric)
    for top_n in (1, 10, 600):
        assert_matches_reference(index, codes, queries, top_n)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_dense_queries_match_brute_force(k, metric):
    """Dense rows weigh every latent, with either sign; some latents weighed 0 and some stored codes empty."""
    dim = 96
    codes = random_codes(300, dim, k, seed=k, zero_frac=0.3)
    rng = np.random.default_rng(k)
    queries = rng.normal(size=(20, dim)).astype(np.float32)
    queries[rng.random(queries.shape) < 0.2] = 0.0
    queries[3] = 0.0  # weighs nothing: no candidate
    queries[4, :] = 0.0
    queries[4, codes.indices[0, 0]] = -1.0  # only negative scores
    index = InvertedIndex.build(codes, metric)
    for top_n in (1, 10, 300, 400):
        assert_matches_reference(index, codes, queries, top_n)
    ids, scores = index.search(queries, 5)
    assert (ids[3] == -1).all() and (scores[4][ids[4] >= 0] < 0).all()


@pytest.mark.skipif(True not in SEARCH_PATHS, reason="the compiled kernel needs numba")
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_the_kernel_equals_the_numpy_path_across_blocks(metric):
    """The kernel sums index_module.BLOCK vectors at a time: an index of three blocks and a bit, searched with narrow,
    wide and dense queries (some latents unused, a popular latent whose list spans every block), gives the numpy path's results."""
    n, dim = 3 * index_module.BLOCK + 17, 64
    codes = random_codes(n, dim, 2, seed=5)
    codes.indices[::7, 0] = 0  # latent 0 in every block
    codes.indices[::7, 1] = np.where(codes.indices[::7, 1] == 0, 1, codes.indices[::7, 1])
    index = InvertedIndex.build(codes, metric)
    rng = np.random.default_rng(6)
    dense = rng.normal(size=(6, dim)).astype(np.float32)
    dense[:, 10:20] = 0
    for queries in (random_codes(6, dim, 2, seed=7), random_codes(6, dim, 32, seed=8), dense):
        for top_n in (1, 10, 1000):
            want_ids, want_scores = index.search(queries, top_n, compiled=False)
            ids, scores = index.search(queries, top_n, compiled=True)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(scores, want_scores)


def test_dense_queries_are_checked():
    index = InvertedIndex.build(random_codes(10, 16, 2, seed=0))
    with pytest.raises(InputError, match=r"dense queries must be \(q, 16\) float rows"):
        index.search(np.zeros((2, 15), dtype=np.float32), 3)
    with pytest.raises(InputError, match="dense queries must be"):
        index.search(np.zeros((2, 16), dtype=np.int64), 3)
    bad = np.zeros((3, 16), dtype=np.float32)
    bad[2, 5] = np.nan
    with pytest.raises(InputError, match="dense query row 2 is not finite"):
        index.search(bad, 3)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_search_with_many_ties(metric):
    codes = random_codes(300, 12, 2, seed=1, levels=[0.5, 1.0])
    queries = random_codes(20, 12, 3, seed=2, levels=[0.5, 1.0])
    index = InvertedIndex.build(codes, metric)
    for top_n in (1, 7, 60):
        assert_matches_reference(index, codes, queries, top_n)


def test_empty_posting_lists():
    narrow = random_codes(100, 40, 4, seed=3)
    codes = SparseCodes(narrow.indices, narrow.values, 10_000)  # latents 40 .. 9999 are never used
    queries = random_codes(15, 80, 4, seed=4)  # half the query latents hit empty lists
    queries = SparseCodes(queries.indices, queries.values, 10_000)
    index = InvertedIndex.build(codes)
    assert (np.diff(index.offsets)[40:] == 0).all()
    assert_matches_reference(index, codes, queries, 5)


def test_queries_touching_no_posting_list():
    index = InvertedIndex.build(random_codes(50, 100, 2, seed=5, zero_frac=0.0))
    unused = np.flatnonzero(np.diff(index.offsets) == 0)  # latents no code uses
    queries = SparseCodes(
        np.array([[unused[0], unused[1]], [0, 1]], dtype=np.int32), np.array([[1.0, 0.5], [0.0, 0.0]], np.float32), 100
    )
    ids, scores = index.search(queries, 4)
    assert (ids == -1).all() and np.isneginf(scores).all()


def test_zero_slots_are_not_indexed():
    indices = np.array([[3, 1], [0, 2], [4, 0]], dtype=np.int32)
    values = np.array([[2.0, 1.0], [5.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    index = InvertedIndex.build(SparseCodes(indices, values, 5))
    assert len(index) == 3 and index.dim == 5
    assert index.offsets.tolist() == [0, 1, 2, 2, 3, 3]  # latent 2 (a zero slot of row 1) and 4 stay empty
    assert unpack_ids(index.ids).tolist() == [1, 0, 0] and index.values.tolist() == [5.0, 1.0, 2.0]
    queries = SparseCodes(np.array([[3, 0], [2, 4]], np.int32), np.array([[1.0, 2.0], [1.0, 1.0]], np.float32), 5)
    ids, scores = index.search(queries, 3)
    assert ids.tolist() == [[1, 0, -1], [-1, -1, -1]]  # worked by hand: row 1 scores 5 x 2, row 0 scores 2 x 1
    assert scores[0, :2].tolist() == [10.0, 2.0] and np.isneginf(scores[0, 2]) and np.isneginf(scores[1]).all()


def test_values_that_round_to_zero_in_float16_are_not_indexed():
    codes = SparseCodes(np.array([[0, 1], [0, 2]], np.int32), np.array([[1.0, 1e-9], [1.0, 0.5]], np.float32), 3)
    index = InvertedIndex.build(codes)
    assert index.offsets.tolist() == [0, 2, 2, 3]  # 1e-9 is below float16's smallest step
    ids, _ = index.search(SparseCodes(np.array([[1]], np.int32), np.ones((1, 1), np.float32), 3), 2)
    assert ids.tolist() == [[-1, -1]]


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_add_equals_building_once(metric, tmp_path):
    a, b, c = (random_codes(n, 256, 4, seed=s) for n, s in ((150, 6), (90, 7), (40, 8)))
    index = InvertedIndex.build(a, metric)
    index.add(b)
    index.save(tmp_path / "i.idx")
    index = InvertedIndex.open(tmp_path / "i.idx")  # adding to a memory-mapped index builds new arrays
    index.add(c)
    every = SparseCodes(np.concatenate([a.indices, b.indices, c.indices]), np.concatenate([a.values, b.values, c.values]), 256)
    once = InvertedIndex.build(every, metric)
    assert len(index) == len(once) == 280
    for name in ("offsets", "ids", "values"):
        np.testing.assert_array_equal(getattr(index, name), getattr(once, name))
    assert_matches_reference(index, every, random_codes(20, 256, 4, seed=9), 10)
    with pytest.raises(InputError, match="dim 128 but the index has dim 256"):
        index.add(random_codes(5, 128, 4, seed=10))


@pytest.mark.parametrize("mmap", [True, False])
def test_save_open_round_trip(tmp_path, mmap):
    codes = random_codes(500, 300, 2, seed=11)
    index = InvertedIndex.build(codes, "cosine")
    path = tmp_path / "codes.idx"
    index.save(path)
    opened = InvertedIndex.open(path, mmap=mmap)
    assert isinstance(opened.ids, np.memmap) == mmap and (len(opened), opened.dim, opened.metric) == (500, 300, "cosine")
    assert opened.bytes_per_vector() == index.bytes_per_vector() and opened.nbytes == index.nbytes
    queries = random_codes(25, 300, 2, seed=12)
    for got, want in zip(opened.search(queries, 8), index.search(queries, 8), strict=True):
        np.testing.assert_array_equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.idx"]  # no temporary file left behind


def test_empty_index_round_trip(tmp_path):
    index = InvertedIndex.build(SparseCodes(np.zeros((0, 2), np.int32), np.zeros((0, 2), np.float32), 16))
    index.save(tmp_path / "e.idx")
    opened = InvertedIndex.open(tmp_path / "e.idx")
    assert len(opened) == 0 and opened.dim == 16 and np.isnan(opened.bytes_per_vector())
    for compiled in SEARCH_PATHS:
        ids, scores = opened.search(random_codes(3, 16, 2, seed=13), 2, compiled=compiled)
        assert ids.shape == scores.shape == (3, 0)  # no wider than the index


@pytest.fixture()
def saved(tmp_path):
    """(path, bytes) of a saved index."""
    path = tmp_path / "i.idx"
    InvertedIndex.build(random_codes(200, 64, 2, seed=14)).save(path)
    return path, path.read_bytes()


def rewrite(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"PK\x03\x04" + b[4:], "not a csrv2 index file"),
        (lambda b: b[:3], "not a csrv2 index file"),
        (lambda b: b[:8] + (1).to_bytes(4, "little") + b[12:], "format version 1, this csrv2 reads versions 2 to 3"),
        (lambda b: b[:40], "truncated"),
        (lambda b: b[:-10], "truncated"),
        (lambda b: b + b"\0" * 64, "truncated or damaged"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x01]), "corrupted \\(checksum mismatch\\)"),
        (lambda b: b[:24] + (999).to_bytes(8, "little") + b[32:], "corrupted"),  # n in the header
    ],
)
def test_bad_files_raise_one_line(saved, damage, message):
    path, data = saved
    with pytest.raises(InputError, match=message) as e:
        InvertedIndex.open(rewrite(path, damage(data)))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_version_2_files_still_open_and_do_not_know_their_head(saved):
    """A version-2 file: the same arrays, a header without the head digest (the CRC right after nnz)."""
    path, data = saved
    _, _, metric, dim, n, nnz = index_module.FIELDS.unpack_from(data)
    fields = index_module.FIELDS.pack(b"CSRV2IDX", 2, metric, dim, n, nnz)
    crc = zlib.crc32(data[index_module.HEADER_SIZE :], zlib.crc32(fields))
    header = fields + crc.to_bytes(4, "little")
    v2 = InvertedIndex.open(rewrite(path, header + bytes(64 - len(header)) + data[64:]))
    v3 = InvertedIndex.open(rewrite(path.with_suffix(".v3"), data))
    assert v2.head_digest is None and (len(v2), v2.dim, v2.metric) == (200, 64, "ip")
    queries = random_codes(10, 64, 2, seed=20)
    for got, want in zip(v2.search(queries, 5), v3.search(queries, 5), strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_head_digest_survives_save_add_and_open(tmp_path, make_head):
    head = make_head(input_dim=8, hidden_dim=64, k=2)
    digest = head.digest()
    assert len(digest) == 64 and digest == make_head(input_dim=8, hidden_dim=64, k=2).digest()  # the same weights, the same digest
    index = InvertedIndex.build(random_codes(30, 64, 2, seed=21), head_digest=digest)
    index.add(random_codes(5, 64, 2, seed=22))  # codes added come from the same head
    index.save(tmp_path / "i.idx")
    assert InvertedIndex.open(tmp_path / "i.idx").head_digest == index.head_digest == digest[:32]
    InvertedIndex.build(random_codes(3, 64, 2, seed=23)).save(tmp_path / "none.idx")
    assert InvertedIndex.open(tmp_path / "none.idx").head_digest is None
    with pytest.raises(ValueError, match="head_digest must be a hex digest"):
        InvertedIndex.build(random_codes(3, 64, 2, seed=23), head_digest="not hex")


def test_verify_false_skips_the_checksum(saved):
    path, data = saved
    InvertedIndex.open(rewrite(path, data[:-1] + bytes([data[-1] ^ 0x01])), verify=False)


def test_missing_file_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot be read"):
        InvertedIndex.open(tmp_path / "nope.idx")


def test_interrupted_save_keeps_the_old_file(saved, monkeypatch):
    path, _ = saved
    old = InvertedIndex.open(path)
    queries = random_codes(10, 64, 2, seed=15)
    expected = old.search(queries, 5)

    real_fdopen = os.fdopen

    class FailingFile:
        """A file whose second write fails, as on a full disk: the temporary file exists, half written."""

        def __init__(self, *args):
            self.f, self.writes = real_fdopen(*args), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                raise OSError(28, "No space left on device")
            return self.f.write(data)

    monkeypatch.setattr(atomic.os, "fdopen", FailingFile)
    with pytest.raises(OSError, match="No space left"):
        InvertedIndex.build(random_codes(300, 64, 2, seed=16)).save(path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
    for got, want in zip(InvertedIndex.open(path).search(queries, 5), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_query_and_code_validation():
    codes = random_codes(20, 32, 2, seed=17)
    index = InvertedIndex.build(codes)
    with pytest.raises(InputError, match="queries have dim 16 but the index has dim 32") as e:
        index.search(random_codes(2, 16, 2, seed=18), 3)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="top_n"):
        index.search(codes, 0)
    for bad in (-1.0, np.nan, np.inf):
        values = codes.values.copy()
        values[3, 1] = bad
        broken = SparseCodes(codes.indices, values, 32)
        for call in (lambda b=broken: index.search(b, 3), lambda b=broken: InvertedIndex.build(b), lambda b=broken: index.add(b)):
            with pytest.raises(InputError, match="row 3 has a negative, NaN or Inf value"):
                call()
    assert len(index) == 20  # the failed add changed nothing
    dup = SparseCodes(np.array([[5, 5]], np.int32), np.ones((1, 2), np.float32), 32)
    with pytest.raises(InputError, match="uses a latent twice"):
        InvertedIndex.build(dup)
    outside = SparseCodes(np.array([[5, 32]], np.int32), np.ones((1, 2), np.float32), 32)
    with pytest.raises(InputError, match="outside"):
        index.search(outside, 1)
    with pytest.raises(InputError, match="float16"):
        InvertedIndex.build(SparseCodes(np.array([[1, 2]], np.int32), np.array([[1e5, 1.0]], np.float32), 32))
    InvertedIndex.build(SparseCodes(np.array([[1, 2]], np.int32), np.array([[1e5, 1.0]], np.float32), 32), "cosine")
    with pytest.raises(ValueError, match="metric"):
        InvertedIndex.build(codes, "l2")


def test_bytes_per_vector_at_k2():
    n, dim = 10_000, 1536
    index = InvertedIndex.build(random_codes(n, dim, 2, seed=19, zero_frac=0.0))
    # 2 postings x (3 B id + 2 B value) = 10 B, plus the (dim + 1) int64 offsets shared by all n vectors
    assert index.nbytes == n * 10 + (dim + 1) * 8
    assert index.bytes_per_vector() == pytest.approx(10 + 8 * 1537 / 10_000)  # 11.2296
    print(f"bytes per vector at k = 2, n = {n}, dim = {dim}: {index.bytes_per_vector():.4f}")


def test_ids_pack_into_three_bytes_and_back():
    ids = np.array([0, 1, 255, 256, 65535, 65536, 2**24 - 1])
    packed = pack_ids(ids)
    assert packed.shape == (7, 3) and packed.dtype == np.uint8
    assert unpack_ids(packed).tolist() == ids.tolist()
    assert packed[3].tolist() == [0, 1, 0]  # 256, little-endian


def test_more_than_2_pow_24_vectors_are_refused(monkeypatch):
    monkeypatch.setattr(index_module, "MAX_VECTORS", 4)
    codes = random_codes(3, 16, 2, seed=3)
    index = InvertedIndex.build(codes)
    with pytest.raises(InputError, match="3-byte ids"):
        index.add(codes)
