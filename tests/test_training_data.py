"""Training files: .npy (memory-mapped), .npz with labels or pairs, folders of shards; bad files refused in one line."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from csrv2.data.training import ShardedArray, TrainingData, check_embeddings, class_ids, load_array, load_training_data
from csrv2.errors import InputError


def _x(n: int = 6, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _one_line_error(call, match: str) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return info.value


def test_npy_is_memory_mapped(tmp_path):
    x = _x()
    np.save(tmp_path / "x.npy", x)
    data = load_training_data(tmp_path / "x.npy")
    assert isinstance(data.embeddings, np.memmap) and data.labels is None and data.documents is None
    np.testing.assert_array_equal(data.embeddings, x)
    assert (len(data), data.dim) == (6, 4)


def test_npz_with_embeddings_and_labels(tmp_path):
    x = _x()
    np.savez(tmp_path / "d.npz", embeddings=x, labels=np.array(["b", "a", "b", "c", "a", "c"]))
    data = load_training_data(tmp_path / "d.npz")
    np.testing.assert_array_equal(data.embeddings, x)
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [1, 0, 1, 2, 0, 2]
    # labels from a file of their own replace none: the embeddings file carries none
    np.savez(tmp_path / "x.npz", embeddings=x)
    np.save(tmp_path / "y.npy", np.array([3, 3, 7, 7, 3, 7]))
    assert load_training_data(tmp_path / "x.npz", labels=tmp_path / "y.npy").labels.tolist() == [0, 0, 1, 1, 0, 1]


def test_npz_with_queries_and_documents(tmp_path):
    q, d = _x(seed=1), _x(seed=2)
    np.savez(tmp_path / "pairs.npz", queries=q, documents=d)
    data = load_training_data(tmp_path / "pairs.npz")
    np.testing.assert_array_equal(data.embeddings, q)
    np.testing.assert_array_equal(data.documents, d)
    assert data.labels is None
    np.savez(tmp_path / "other.npz", vectors=q)
    _one_line_error(lambda: load_training_data(tmp_path / "other.npz"), r"found arrays \['vectors'\]; name them embeddings")


def _shards(folder, name: str, parts: list[np.ndarray]) -> None:
    folder.mkdir(exist_ok=True)
    for i, part in enumerate(parts):
        np.save(folder / f"{name}-{i:05d}.npy", part)


def test_shard_folder_reads_as_one_array(tmp_path):
    x = _x(n=9, d=3)
    y = np.array(list("abcabcabc"))
    _shards(tmp_path / "s", "embeddings", [x[:3], x[3:7], x[7:]])  # 3, 4 and 2 rows
    _shards(tmp_path / "s", "labels", [y[:3], y[3:7], y[7:]])
    data = load_training_data(tmp_path / "s")
    sharded = data.embeddings
    assert isinstance(sharded, ShardedArray)
    assert (len(sharded), sharded.shape, sharded.dtype, sharded.ndim) == (9, (9, 3), np.float32, 2)
    assert all(isinstance(s, np.memmap) for s in sharded.shards)  # never read whole
    for rows in (slice(None), slice(2, 8), slice(6, 7), slice(8, 1, -2), [8, 0, 3, 3, 6, 2], np.array([7, 4]), []):
        np.testing.assert_array_equal(sharded[rows], x[rows])
    assert data.labels.tolist() == [0, 1, 2] * 3


def test_shard_folder_of_pairs(tmp_path):
    q, d = _x(n=5, seed=1), _x(n=5, seed=2)
    _shards(tmp_path / "p", "queries", [q[:2], q[2:]])
    _shards(tmp_path / "p", "documents", [d[:2], d[2:]])
    data = load_training_data(tmp_path / "p")
    np.testing.assert_array_equal(data.embeddings[:], q)
    np.testing.assert_array_equal(data.documents[[4, 1]], d[[4, 1]])
    (tmp_path / "p" / "documents-00001.npy").unlink()
    _one_line_error(lambda: load_training_data(tmp_path / "p"), "documents-00001.npy is missing")


def test_labels_of_the_wrong_length(tmp_path):
    np.savez(tmp_path / "d.npz", embeddings=_x(), labels=np.arange(5))
    _one_line_error(lambda: load_training_data(tmp_path / "d.npz"), r"labels have shape \(5,\) but there are 6 embeddings")
    _one_line_error(lambda: TrainingData(_x(), labels=np.zeros((6, 1), np.int64)), "one label per embedding row")


def test_documents_of_another_shape(tmp_path):
    np.savez(tmp_path / "p.npz", queries=_x(d=4), documents=_x(d=5))
    _one_line_error(lambda: load_training_data(tmp_path / "p.npz"), r"documents have shape \(6, 5\) but queries \(6, 4\)")
    _one_line_error(lambda: TrainingData(_x(), labels=np.zeros(6, np.int64), documents=_x()), "labels or documents, not both")


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _one_line_error(lambda: load_training_data(tmp_path / "objects.npy"), "objects.npy: .*Python objects")
    with open(tmp_path / "raw.npy", "wb") as f:  # a bare pickle under a .npy name
        pickle.dump(_x(), f)
    _one_line_error(lambda: load_array(tmp_path / "raw.npy"), "holds pickled Python objects")


def test_empty_missing_and_unreadable_files(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    _one_line_error(lambda: load_training_data(tmp_path / "empty.npy"), "the file is empty")
    _one_line_error(lambda: load_training_data(tmp_path / "nope.npy"), "no such file")
    (tmp_path / "text.npz").write_text("not a zip")
    _one_line_error(lambda: load_training_data(tmp_path / "text.npz"), "cannot be read as a NumPy .npz file")
    np.save(tmp_path / "zero.npy", np.zeros((0, 4), np.float32))
    _one_line_error(lambda: load_training_data(tmp_path / "zero.npy"), "embeddings is empty")
    np.save(tmp_path / "ints.npy", np.ones((3, 4), np.int32))
    _one_line_error(lambda: load_training_data(tmp_path / "ints.npy"), "dtype int32")


def test_a_nan_row_is_reported_with_its_row_number(tmp_path):
    x = _x(n=10)
    x[7, 2] = np.nan
    np.save(tmp_path / "x.npy", x)
    _one_line_error(lambda: load_training_data(tmp_path / "x.npy"), "embeddings row 7 has NaN or Inf")
    x[7, 2], x[9, 0] = 0.0, np.inf
    _one_line_error(lambda: check_embeddings(x, "documents", chunk_rows=4), "documents row 9 has NaN or Inf")  # found in the last chunk


def test_class_ids_map_strings_and_ints():
    assert class_ids(np.array(["sport", "business", "sport", "tech"])).tolist() == [1, 0, 1, 2]
    ids = class_ids(np.array([10, -1, 10, 3]))
    assert ids.dtype == np.int64 and ids.tolist() == [2, 0, 2, 1]
    assert class_ids(np.array([True, False])).tolist() == [1, 0]
    _one_line_error(lambda: class_ids(np.zeros((2, 2))), r"labels must be 1-D")
