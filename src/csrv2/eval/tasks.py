"""The evaluation suite: which data each task scores, what its heads train on, and how it is scored.

A task scores any representation: a function from dense (n, d) backbone embeddings to either dense
vectors (the backbone, a truncation, a Matryoshka head) or `SparseCodes` (CSR, CSRv2).

Training data per task, never its test split:
  classification and clustering: the data set's train split with its labels (clustering scores the
    test split of the same data set, so it shares the classification task's heads);
  retrieval (news title -> article): train (title, article) pairs; scored with held-out titles as
    queries over the held-out articles;
  STS (Lee-50): has no training data of its own, so its heads are the news-retrieval heads, trained on
    news (title, article) pairs of the same domain; Lee-50's own 50 documents never train anything;
  images: the train split's features with labels; scored by 1-NN top-1 on the test split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..codes import SparseCodes
from ..data.backbones import Backbone
from ..data.cache import EmbeddingCache
from ..data.datasets import LabelledImages, LabelledTexts, SimilarityPairs, TextPairs
from ..data.training import TrainingData, class_ids
from .metrics import (
    logistic_regression_accuracy,
    nearest_neighbour_accuracy,
    retrieval_metrics,
    spearman,
    v_measure,
)

Kind = Literal["classification", "clustering", "retrieval", "sts", "image"]
Representation = np.ndarray | SparseCodes


@dataclass(frozen=True)
class Task:
    """name: how the CLI calls it; dataset: the loader it scores; training_set: the data set whose train split trains its heads."""

    name: str
    kind: Kind
    dataset: str
    training_set: str
    metric: str


TASKS = {
    task.name: task
    for task in (
        Task("bbc-news", "classification", "bbc-news", "bbc-news", "accuracy"),
        Task("reuters-r8", "classification", "reuters-r8", "reuters-r8", "accuracy"),
        Task("20newsgroups", "classification", "20newsgroups", "20newsgroups", "accuracy"),
        Task("20newsgroups-clustering", "clustering", "20newsgroups", "20newsgroups", "v_measure"),
        Task("news-retrieval", "retrieval", "news-retrieval", "news-retrieval", "ndcg@10"),
        Task("lee50", "sts", "lee50", "news-retrieval", "spearman"),
        Task("fashion-mnist", "image", "fashion-mnist", "fashion-mnist", "1nn_accuracy"),
        Task("digits", "image", "digits", "digits", "1nn_accuracy"),
    )
}
DEFAULT_TASKS = ("bbc-news", "reuters-r8", "20newsgroups", "20newsgroups-clustering", "news-retrieval", "lee50")


@dataclass
class EmbeddedSet:
    """One data set's embeddings. train/test: (n, d); for pairs, train/test are the queries and
    *_documents their row-aligned documents; for STS, test holds the texts and pairs/scores the gold."""

    name: str
    train: np.ndarray | None = None
    test: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    train_documents: np.ndarray | None = None
    test_documents: np.ndarray | None = None
    pairs: np.ndarray | None = None
    scores: np.ndarray | None = None
    sizes: dict = field(default_factory=dict)


def embed_dataset(dataset, backbone: Backbone, cache: EmbeddingCache, progress: bool = True) -> EmbeddedSet:
    """Embed every text (or image) of a loaded data set through the cache."""

    def get(items):
        return cache.get(backbone, items, progress=progress)

    if isinstance(dataset, (LabelledTexts, LabelledImages)):
        train_items, test_items = (
            (dataset.train_texts, dataset.test_texts) if isinstance(dataset, LabelledTexts) else (dataset.train_images, dataset.test_images)
        )
        return EmbeddedSet(
            dataset.name, get(train_items), get(test_items), np.asarray(dataset.train_labels), np.asarray(dataset.test_labels),
            sizes={"train": len(train_items), "test": len(test_items)},
        )
    if isinstance(dataset, TextPairs):
        return EmbeddedSet(
            dataset.name, get(dataset.train_queries), get(dataset.test_queries),
            train_documents=get(dataset.train_documents), test_documents=get(dataset.test_documents),
            sizes={"train_pairs": len(dataset.train_queries), "test_pairs": len(dataset.test_queries)},
        )
    if isinstance(dataset, SimilarityPairs):
        return EmbeddedSet(
            dataset.name, test=get(dataset.texts), pairs=dataset.pairs, scores=dataset.scores,
            sizes={"texts": len(dataset.texts), "pairs": len(dataset.pairs)},
        )
    raise TypeError(f"cannot embed a {type(dataset).__name__}")


def held_out_rows(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows that still train, rows held out for validation) of a train split of n rows, each sorted."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(fraction * n))
    return np.sort(order[cut:]), np.sort(order[:cut])


def hold_out(data: EmbeddedSet, fraction: float = 0.2, seed: int = 0) -> EmbeddedSet:
    """A validation version of `data`: a seeded `fraction` of its train split becomes the split scored,
    the rest trains; its test split is dropped. For choosing settings without looking at test splits."""
    if data.train is None:
        raise ValueError(f"{data.name} has no train split to hold a validation part out of")
    train, val = held_out_rows(len(data.train), fraction, seed)

    def part(a, rows):
        return None if a is None else a[rows]

    return EmbeddedSet(
        f"{data.name}-validation", data.train[train], data.train[val], part(data.train_labels, train), part(data.train_labels, val),
        part(data.train_documents, train), part(data.train_documents, val), sizes={"train": len(train), "validation": len(val)},
    )


def training_data(data: EmbeddedSet, with_labels: bool) -> TrainingData:
    """The train split as `TrainingData`: queries with their documents for pairs (every method's contrastive
    loss reads the pairing, CSR v1's included), else the vectors, with their labels only when `with_labels`."""
    if data.train is None:
        raise ValueError(f"{data.name} has no train split to train heads on")
    if data.train_documents is not None:
        return TrainingData(data.train, documents=data.train_documents)
    return TrainingData(data.train, class_ids(data.train_labels) if with_labels else None)


def training_items(dataset, validation: bool = False, seed: int = 0) -> tuple:
    """(items, labels, documents) of a loaded data set's train split, what end-to-end methods train on:
    texts or images with labels, or queries with their documents (labels None). With validation, only
    the rows `hold_out` keeps for training."""
    if isinstance(dataset, TextPairs):
        items, labels, documents = dataset.train_queries, None, dataset.train_documents
    elif isinstance(dataset, (LabelledTexts, LabelledImages)):
        items = dataset.train_texts if isinstance(dataset, LabelledTexts) else dataset.train_images
        labels, documents = np.asarray(dataset.train_labels), None
    else:
        raise ValueError(f"{dataset.name} has no train split to train on")
    if not validation:
        return items, labels, documents
    rows = held_out_rows(len(items), seed=seed)[0]

    def pick(a):
        return None if a is None else a[rows] if isinstance(a, np.ndarray) else [a[i] for i in rows]

    return pick(items), pick(labels), pick(documents)


def _matrix(r: Representation):
    return r.to_scipy() if isinstance(r, SparseCodes) else r


def score(task: Task, data: EmbeddedSet, represent: Callable[[np.ndarray], Representation],
          queries: dict[str, Callable[[np.ndarray], Representation]] | None = None) -> tuple[dict[str, float], list[Representation]]:
    """Metrics of one representation on one task, and the evaluation-set representations it scored
    (for code statistics). Only the test side of a split is ever scored.

    queries: for asymmetric search, query sides by name (e.g. {"dense": project}); each scores the
    task's searching metrics again with its queries against the same `represent`ed documents:
    retrieval's test queries against the test documents, and 1-NN's test rows against the train rows,
    as "<metric> <name>". Logistic regression, clustering and STS compare like with like and are
    scored once.
    """
    queries = queries or {}
    if task.kind in ("classification", "image"):
        train, test = represent(data.train), represent(data.test)
        a, b = _matrix(train), _matrix(test)
        metrics = {
            "accuracy": logistic_regression_accuracy(a, data.train_labels, b, data.test_labels),
            "1nn_accuracy": nearest_neighbour_accuracy(a, data.train_labels, b, data.test_labels),
        }
        for name, query in queries.items():
            metrics[f"1nn_accuracy {name}"] = nearest_neighbour_accuracy(a, data.train_labels, _matrix(query(data.test)), data.test_labels)
        return metrics, [test]
    if task.kind == "clustering":
        test = represent(data.test)
        return {"v_measure": v_measure(_matrix(test), data.test_labels)}, [test]
    if task.kind == "retrieval":
        queries_x, documents = represent(data.test), represent(data.test_documents)
        metrics = retrieval_metrics(_matrix(queries_x), _matrix(documents))
        for name, query in queries.items():
            found = retrieval_metrics(_matrix(query(data.test)), _matrix(documents))
            metrics.update({f"{metric} {name}": value for metric, value in found.items()})
        return metrics, [queries_x, documents]
    if task.kind == "sts":
        x = represent(data.test)
        return {"spearman": spearman(_matrix(x), data.pairs, data.scores)}, [x]
    raise ValueError(f"unknown task kind {task.kind!r}")


__all__ = ["DEFAULT_TASKS", "TASKS", "EmbeddedSet", "Task", "embed_dataset", "held_out_rows", "hold_out", "score", "training_data",
           "training_items"]
