"""`csrv2 reproduce` on hand-made embeddings: exact scores, the row cache (reuse, rescoring on a change or damage), config checks."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

import csrv2.eval.suite as suite_module
from csrv2.eval.suite import QUICK, SuiteConfig, reproduce
from csrv2.eval.tasks import EmbeddedSet
from csrv2.trainer import Trainer

CLASSES, DIM = 4, 8


def hand_made() -> EmbeddedSet:
    """bbc-news as 4 tight clusters along the first 4 axes of 8 dims: 8 train and 4 test rows per class,
    and one test row of each class labelled as the next class, so every representation that keeps the
    clusters apart scores exactly 12 / 16 = 0.75."""
    rng = np.random.default_rng(0)
    centres = np.eye(DIM, dtype=np.float32)[:CLASSES]

    def around(labels):
        return centres[labels] + 0.05 * rng.normal(size=(len(labels), DIM)).astype(np.float32)

    train_labels, test_labels = np.repeat(np.arange(CLASSES), 8), np.repeat(np.arange(CLASSES), 4)
    test = around(test_labels)
    wrong = test_labels.copy()
    wrong[::4] = (wrong[::4] + 1) % CLASSES
    return EmbeddedSet("bbc-news", around(train_labels), test, train_labels, wrong, sizes={"train": 32, "test": 16})


def hand_made_pairs() -> EmbeddedSet:
    """news-retrieval as 32 train and 16 test (query, document) pairs in 8 dims, each document its query plus a little noise."""
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(48, DIM)).astype(np.float32)
    documents = queries + 0.05 * rng.normal(size=queries.shape).astype(np.float32)
    return EmbeddedSet("news-retrieval", queries[:32], queries[32:], train_documents=documents[:32], test_documents=documents[32:],
                       sizes={"train_pairs": 32, "test_pairs": 16})


@pytest.fixture
def calls(monkeypatch):
    """The suite reads `hand_made()` (`hand_made_pairs()` for news-retrieval) instead of embedding the packaged data and draws
    no plots; counts its trainings and scorings."""
    counts = {"fit": 0, "score": 0}
    fit, score = Trainer.fit, suite_module.score

    def counted_fit(self):
        counts["fit"] += 1
        return fit(self)

    def counted_score(*args, **kwargs):
        counts["score"] += 1
        return score(*args, **kwargs)

    monkeypatch.setattr(suite_module, "load_dataset", lambda name, **sizes: name)
    monkeypatch.setattr(suite_module, "embed_dataset",
                        lambda dataset, backbone, cache, progress=True: hand_made_pairs() if dataset == "news-retrieval" else hand_made())
    monkeypatch.setattr(Trainer, "fit", counted_fit)
    monkeypatch.setattr(suite_module, "score", counted_score)
    monkeypatch.setattr(suite_module, "plot_results", lambda results, out: None)  # most of a run's time; test_report's subject
    return counts


def _config(tmp_path: Path, **fields) -> SuiteConfig:
    return SuiteConfig(**{"tasks": ("bbc-news",), "methods": ("dense", "csrv2-linear"), "k": (2,), "epochs": 1, "device": "cpu",
                          "out": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), **fields})


def _rows(tmp_path: Path, pattern: str) -> list[Path]:
    return sorted((tmp_path / "run" / "rows" / "bbc-news").glob(pattern))


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


def test_hand_made_scores_are_exact(tmp_path, calls):
    rows = reproduce(_config(tmp_path), progress=False)["rows"]
    assert [(r["method"], r["size"], r["protocol"]) for r in rows] == [("dense", DIM, "same-k"), ("csrv2-linear", 2, "same-k"),
                                                                       ("csrv2-linear", 2, "asymmetric")]
    dense = rows[0]
    assert dense["metrics"] == {"accuracy": 0.75, "1nn_accuracy": 0.75} and dense["score"] == 0.75
    assert (dense["active_dims"], dense["dead_latents_pct"], dense["bytes_per_vector"]) == (DIM, None, 4 * DIM)
    assert rows[1]["train_steps"] == 1 and rows[1]["active_dims"] <= 2  # 32 rows, one batch of 128, one epoch
    # the asymmetric row: the same codes and logistic accuracy, 1-NN scored again with richer queries
    same, asym = rows[1:]
    assert set(same["metrics"]) == {"accuracy", "1nn_accuracy", "1nn_accuracy query k=32", "1nn_accuracy dense query"}
    assert asym["metrics"] == same["metrics"] and asym["score"] == same["score"] and asym["queries"] == "query k=32"


def test_the_asymmetric_row_scores_retrieval_with_the_chosen_queries(tmp_path, calls):
    for side, name in (("query-k", "query k=16"), ("dense", "dense query")):
        config = _config(tmp_path, tasks=("news-retrieval",), query_k=16, asymmetric=side, out=str(tmp_path / side))
        same, asym = reproduce(config, progress=False)["rows"][1:]
        assert asym["protocol"] == "asymmetric" and asym["queries"] == name and asym["score"] == same["metrics"][f"ndcg@10 {name}"]
        assert same["score"] == same["metrics"]["ndcg@10"]
    # a query k below the row's k codes queries at the row's k: the paper's protocol again
    config = _config(tmp_path, tasks=("news-retrieval",), query_k=1, out=str(tmp_path / "narrow"))
    same = reproduce(config, progress=False)["rows"][1]
    assert same["metrics"]["ndcg@10 query k=1"] == same["metrics"]["ndcg@10"]


def test_a_scored_row_is_stored_and_a_rerun_reuses_it(tmp_path, calls):
    first = reproduce(_config(tmp_path), progress=False)["rows"]
    assert calls == {"fit": 1, "score": 2}
    stored = [*_rows(tmp_path, "dense-8-*.json"), *_rows(tmp_path, "csrv2-linear-2-*.json")]
    assert len(stored) == 2 and len(_rows(tmp_path, "*")) == 2
    assert [r for p in stored for r in json.loads(p.read_text())] == first  # a file holds the rows of one scoring
    again = reproduce(_config(tmp_path), progress=False)["rows"]
    assert calls == {"fit": 1, "score": 2}  # nothing trained or scored again
    assert again == first  # the stored rows, timings included


def test_a_changed_setting_scores_again(tmp_path, calls):
    first = reproduce(_config(tmp_path), progress=False)["rows"]
    second = reproduce(_config(tmp_path, epochs=2), progress=False)["rows"]
    # epochs change the trained head, so its row; the dense row does not depend on them and is reused
    assert calls == {"fit": 2, "score": 3}
    assert second[0] == first[0] and second[1]["train_steps"] == 2
    assert len(_rows(tmp_path, "csrv2-linear-2-*.json")) == 2 and len(_rows(tmp_path, "dense-*.json")) == 1
    reproduce(_config(tmp_path, k=(3,)), progress=False)  # another size: another head and row
    assert calls == {"fit": 3, "score": 4}


def test_a_damaged_row_is_scored_again(tmp_path, calls):
    first = reproduce(_config(tmp_path), progress=False)["rows"]
    (dense,) = _rows(tmp_path, "dense-*.json")
    dense.write_text('{"task": "bbc-ne')  # as a crash mid-write would leave it without the atomic writer
    again = reproduce(_config(tmp_path), progress=False)["rows"]
    assert calls == {"fit": 1, "score": 3}  # the dense row scored again; the head and its row reused
    assert _untimed(again) == _untimed(first)
    assert _untimed(json.loads(dense.read_text())) == _untimed(first[:1])  # and stored whole again


def test_csr_trains_on_the_retrieval_pairs_and_on_classification_without_labels(tmp_path, calls, monkeypatch):
    trained = []  # (anneal, contrastive form, rows, with labels) of each head, in the order of the plan
    fit = Trainer.fit

    def recorded(self):
        trained.append((self.cfg.anneal, self.mode, len(self.data), self.data.labels is not None))
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", recorded)
    config = _config(tmp_path, tasks=("bbc-news", "news-retrieval"), methods=("csr", "csrv2-linear"))
    rows = [r for r in reproduce(config, progress=False)["rows"] if r["protocol"] == "same-k"]
    assert [(r["task"], r["method"]) for r in rows] == [(t, m) for t in ("bbc-news", "news-retrieval") for m in ("csr", "csrv2-linear")]
    assert trained == [(False, "self", 32, False), (True, "supervised", 32, True),  # bbc-news: CSR reads no labels
                       (False, "pairs", 32, False), (True, "pairs", 32, False)]  # retrieval: both on the 32 pairs, not 64 pooled texts


def test_only_the_heads_whose_recipe_departs_change_their_keys(tmp_path, calls):
    """csr on pairs (its contrastive form) and pairs heads at k >= 8 (their temperature) get new keys; every other head keeps its own."""
    config = _config(tmp_path, tasks=("bbc-news", "news-retrieval"), methods=("csr", "csrv2-linear"), k=(2, 4, 8))
    suite = suite_module.Suite(config, progress=False)
    for name in ("bbc-news", "news-retrieval"):
        suite.data[name] = suite.embed(name)
        suite.hashes[name] = suite_module._data_hash(suite.data[name])

    def first_recipe(name, method, k):  # the key of a head trained as the suite's first recipe trained it
        return suite_module._hash([suite.hashes[name], method, k, suite.budget_for(name, method), config.hidden_dim, version("csrv2")])

    for name in ("bbc-news", "news-retrieval"):
        for method in ("csr", "csrv2-linear"):
            for k in (2, 4, 8):
                changed = suite.head_key(name, method, k) != first_recipe(name, method, k)
                assert changed == (name == "news-retrieval" and (method == "csr" or k >= 8)), (name, method, k)
    assert suite.contrastive_form("news-retrieval", "csr") == "pairs" and suite.contrastive_form("bbc-news", "csr") == "self"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tasks": ("bbc-news", "imdb")}, r"unknown tasks \['imdb'\]; choose from bbc-news"),
        ({"tasks": ()}, "unknown tasks"),
        ({"methods": ("dense", "bm25")}, r"unknown methods \['bm25'\]; choose from dense"),
        ({"methods": ()}, "unknown methods"),
        ({"k": (2, 0)}, r"k must be positive sizes, got \(2, 0\)"),
        ({"k": ()}, "k must be positive sizes"),
        ({"finetune_k": (-1,)}, "finetune_k must be positive sizes"),
        ({"max_train": 0}, "max_train must be >= 1"),
        ({"epochs": 0}, "epochs must be >= 1"),
    ],
)
def test_config_checks(fields, message):
    with pytest.raises(ValueError, match=message):
        SuiteConfig(**fields)


def test_quick_replaces_only_the_fields_left_at_their_defaults():
    plain = SuiteConfig(max_train=123)
    assert plain.resolved() is plain  # without quick, the config runs as given
    quick = SuiteConfig(quick=True).resolved()
    assert (quick.max_train, quick.max_test, quick.k) == (QUICK["max_train"], QUICK["max_test"], QUICK["k"]) == (400, 200, (2, 8, 32))
    assert quick.epochs == SuiteConfig().epochs  # QUICK leaves the training budget alone
    mixed = SuiteConfig(quick=True, max_train=123, k=(4,)).resolved()
    assert (mixed.max_train, mixed.max_test, mixed.k) == (123, 200, (4,))
