"""`csrv2 reproduce --data FILE`: the user's own data as tasks of the suite, beside or instead of the packaged ones.

A file gives tasks named after its stem:
  a labelled table (.csv, .jsonl, .parquet: a text and a label column) -> "<stem>" (classification) and
    "<stem>-clustering", which share the heads trained on its train split;
  a pairs table (`pairs`: a query and a document column, row-aligned) -> "<stem>" (retrieval);
  embeddings the user already has (.npz of `embeddings` + `labels`, or `queries` + `documents`; or an
    .npy with a labels file) -> the same tasks on them, with no backbone run; any dimension.
A table is split by its `split` column (train / test) when it has one, else by a seeded split (test
fraction 0.2); embeddings by a seeded split of their rows. max_train / max_test cap both sides as for
the packaged data. Every file is read by the readers of `csrv2 embed` / `csrv2 train`, so a bad file
gets their one-line errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.datasets import DATASETS, LabelledTexts, TextPairs, column_split_rows, read_split, split_rows
from ..data.embed import read_source
from ..data.training import load_training_data
from ..errors import InputError
from .tasks import TASKS, EmbeddedSet, Task

TEST_FRACTION = 0.2
EMBEDDINGS = (".npz", ".npy")


def user_tasks(name: str, loaded: LabelledTexts | TextPairs | EmbeddedSet) -> list[Task]:
    """The tasks a loaded user data set gives: retrieval for pairs, else classification and clustering on one set of heads."""
    if isinstance(loaded, TextPairs) or isinstance(loaded, EmbeddedSet) and loaded.test_documents is not None:
        return [Task(name, "retrieval", name, name, "ndcg@10")]
    return [Task(name, "classification", name, name, "accuracy"), Task(f"{name}-clustering", "clustering", name, name, "v_measure")]


def data_name(path: str) -> str:
    """The data set name of a user file, its stem; refused where it would take a packaged set's or task's place."""
    name = Path(path).stem if Path(path).suffix else Path(path).name
    if name in DATASETS or name in TASKS or name.removesuffix("-clustering") in TASKS:
        raise InputError(f"{path}: its name {name!r} is a packaged data set or task's; rename the file")
    return name


def load_user_data(path: str, *, pairs: bool = False, text_column: str = "text", label_column: str = "label",
                   query_column: str = "query", document_column: str = "document", labels: str = "", seed: int = 0,
                   max_train: int | None = None, max_test: int | None = None) -> LabelledTexts | TextPairs | EmbeddedSet:
    """A user file split for the suite: texts to embed (LabelledTexts or TextPairs), or embeddings already
    split (EmbeddedSet, train/test (n, d) float32) when it holds vectors. Test rows never reach the train side."""
    name = data_name(path)
    sizes = {"seed": seed, "max_train": max_train, "max_test": max_test}
    if Path(path).suffix in EMBEDDINGS or Path(path).is_dir():
        return _embeddings(name, path, labels, **sizes)
    if not Path(path).is_file():  # read_source would take a packaged set's name for that set
        raise InputError(f"{path}: no such file; give a .csv, .jsonl or .parquet table, or an .npz of embeddings")
    if not pairs and not label_column:
        raise InputError(f"{path}: classification needs labels; name the label column with --label-column, or pass --pairs")
    items = read_source(path, pairs=pairs, text_column=text_column, label_column=label_column, query_column=query_column,
                        document_column=document_column)
    split = read_split(path)
    if pairs:
        queries, documents = items["queries"], items["documents"]
        train, test = _rows(split, queries, **sizes)
        return TextPairs(name, _pick(queries, train), _pick(documents, train), _pick(queries, test), _pick(documents, test))
    texts, values = items["texts"], np.asarray(items["labels"])
    train, test = _rows(split, texts, **sizes)
    _check_classes(values[train], f"{path}: the train split")
    return LabelledTexts(name, _pick(texts, train), values[train], _pick(texts, test), values[test])


def _rows(split: list[str] | None, keys: list[str], seed: int, max_train: int | None,
          max_test: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row ids: by the split column when given, else seeded by `keys` (n texts; copies stay on one side)."""
    if split is None:
        return split_rows(keys, TEST_FRACTION, seed, max_train=max_train, max_test=max_test)
    train, test = column_split_rows(split, seed, max_train=max_train, max_test=max_test)
    # a text the user put on both sides would be scored after training on it: test keeps only texts never trained on
    seen = {keys[i] for i in column_split_rows(split, seed)[0]}
    return train, np.array([i for i in test if keys[i] not in seen], dtype=np.int64)


def _pick(items: list[str], rows: np.ndarray) -> list[str]:
    return [items[i] for i in rows]


def _check_classes(labels: np.ndarray, what: str) -> None:
    if len(np.unique(labels)) < 2:
        raise InputError(f"{what} has {len(np.unique(labels))} class(es); classification needs at least two different labels")


def _embeddings(name: str, path: str, labels: str, seed: int, max_train: int | None, max_test: int | None) -> EmbeddedSet:
    """An embeddings file (`csrv2 train`'s reader: pickles, shapes and NaN rows refused) split by a seeded split of its rows."""
    data = load_training_data(path, labels or None)
    if data.labels is None and data.documents is None:
        raise InputError(f"{path}: holds embeddings without labels or documents; save labels=... with them (or pass --labels for "
                         ".npy), or queries=... and documents=... for retrieval")
    x = np.asarray(data.embeddings, dtype=np.float32)
    # identical vectors stay on one side, as identical texts do
    train, test = split_rows([row.tobytes() for row in x], TEST_FRACTION, seed, max_train=max_train, max_test=max_test)
    if data.documents is not None:
        documents = np.asarray(data.documents, dtype=np.float32)
        return EmbeddedSet(name, x[train], x[test], train_documents=documents[train], test_documents=documents[test],
                           sizes={"train_pairs": len(train), "test_pairs": len(test)})
    _check_classes(data.labels[train], f"{path}: the train split")
    return EmbeddedSet(name, x[train], x[test], data.labels[train], data.labels[test], sizes={"train": len(train), "test": len(test)})


__all__ = ["load_user_data", "user_tasks"]
