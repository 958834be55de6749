"""The suite's plumbing: what each task scores, what its heads train on, and a whole reproduce run with resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from csrv2.codes import SparseCodes
from csrv2.eval.baselines import load_matryoshka, truncate
from csrv2.eval.suite import Suite, SuiteConfig, reproduce
from csrv2.eval.tasks import TASKS, EmbeddedSet, hold_out, score, training_data
from csrv2.head import encode
from csrv2.model import load_head


def _set(**arrays) -> EmbeddedSet:
    return EmbeddedSet("toy", **arrays)


def test_training_data_never_reads_the_test_split():
    rng = np.random.default_rng(0)
    train, docs = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    poisoned = np.full((3, 4), np.nan, dtype=np.float32)  # would fail TrainingData's finiteness check if used
    labelled = _set(train=train, test=poisoned, train_labels=np.array(list("aabbcc")), test_labels=np.array(list("abc")))
    assert training_data(labelled, with_labels=True).labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert training_data(labelled, with_labels=False).labels is None
    pairs = _set(train=train, test=poisoned, train_documents=docs, test_documents=poisoned)
    assert training_data(pairs, with_labels=True).documents is docs
    assert training_data(pairs, with_labels=False).documents is docs  # pairs stay pairs, for CSR too


def test_hold_out_scores_part_of_train_and_never_the_test_split():
    train = np.arange(20, dtype=np.float32).reshape(10, 2)
    data = _set(train=train, test=np.full((3, 2), np.nan, np.float32), train_labels=np.arange(10) % 2, test_labels=np.zeros(3))
    val = hold_out(data, fraction=0.3, seed=1)
    assert val.train.shape == (7, 2) and val.test.shape == (3, 2)
    rows = set(val.train[:, 0].tolist()) | set(val.test[:, 0].tolist())
    assert rows == set(train[:, 0].tolist()) and np.isfinite(val.test).all()  # a partition of train; the test split is gone
    np.testing.assert_array_equal(val.test_labels, (val.test[:, 0] / 2) % 2)  # labels follow their rows
    assert hold_out(data, fraction=0.3, seed=1).test.tolist() == val.test.tolist()  # seeded


def test_score_uses_the_test_side_of_each_task():
    x = np.eye(4, dtype=np.float32)
    # retrieval: query i equals document i, so every query finds its document first
    metrics, evaluated = score(TASKS["news-retrieval"], _set(test=x, test_documents=x.copy()), lambda v: v)
    assert metrics == {"ndcg@10": 1.0, "recall@10": 1.0} and len(evaluated) == 2
    # STS: pairs (0,1) and (0,2) are orthogonal (cosine 0) and (1,1) identical: Spearman against gold 0, 0, 1
    sts = _set(test=x, pairs=np.array([[0, 1], [0, 2], [1, 1]]), scores=np.array([0.1, 0.2, 0.9]))
    assert score(TASKS["lee50"], sts, lambda v: v)[0]["spearman"] == pytest.approx(np.sqrt(3) / 2)
    # classification on codes: each class owns a latent, so logistic regression and 1-NN are exact
    labels = np.array([0, 1, 0, 1])
    codes = SparseCodes(labels[:, None].astype(np.int32), np.ones((4, 1), np.float32), 3)
    cls = _set(train=x, test=x, train_labels=labels, test_labels=labels)
    metrics, evaluated = score(TASKS["bbc-news"], cls, lambda v: codes)
    assert metrics == {"accuracy": 1.0, "1nn_accuracy": 1.0} and evaluated == [codes]


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    config = SuiteConfig(tasks=("digits", "bbc-news", "lee50"), k=(2, 4), max_train=48, max_test=24, epochs=2,
                         max_seq_length=32, image_size=32, out=str(out / "run"), cache_dir=str(out / "cache"), device="cpu")
    suite = Suite(config, progress=False)
    return config, suite.run(), suite


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _representation(heads: Path, method: str, size: int):
    """The function from dense embeddings to what `method` scores at `size`, read from the suite's saved heads."""
    if method == "mrl-truncate":
        return lambda x: truncate(x, size)
    if method == "mrl-linear":
        head = load_matryoshka(next(heads.glob("mrl-linear-*")))
        return lambda x: head.encode(x, size)
    head = load_head(next(heads.glob(f"{method}-k{size}-*")))
    return lambda x: encode(head, x, size, progress=False)


def test_reproduce_scores_every_method_and_writes_its_files(suite_run):
    config, results, suite = suite_run
    every = results["rows"]
    rows = [r for r in every if r["protocol"] == "same-k"]
    assert len(rows) == 3 * (1 + 4 * 2)  # tasks x (dense + four methods at two sizes)
    asymmetric = [r for r in every if r["protocol"] == "asymmetric"]
    assert sorted((r["task"], r["method"], r["size"]) for r in asymmetric) == \
        sorted((t, m, k) for t in ("digits", "bbc-news", "lee50") for m in ("csr", "csrv2-linear") for k in (2, 4))
    assert {r["method"] for r in rows} == {"dense", "mrl-truncate", "mrl-linear", "csr", "csrv2-linear"}
    assert all(r["score"] == r["metrics"][TASKS[r["task"]].metric] for r in rows)
    # asymmetric: digits' 1-NN with queries coded at query k = 32; logistic regression and Spearman as in the paper's protocol
    for r in asymmetric:
        metric = TASKS[r["task"]].metric
        assert r["score"] == r["metrics"][f"{metric} query k=32" if r["task"] == "digits" else metric]
    dense = {r["task"]: r for r in rows if r["method"] == "dense"}
    # The dense rows by hand on the suite's own embeddings: digits by cosine 1-NN, lee50 by Spearman of pair cosines.
    digits = suite.data["digits"]
    nearest = (_unit(digits.test) @ _unit(digits.train).T).argmax(axis=1)
    assert dense["digits"]["score"] == np.mean(digits.train_labels[nearest] == digits.test_labels)
    lee = suite.data["lee50"]
    u = _unit(lee.test)
    cosines = (u[lee.pairs[:, 0]] * u[lee.pairs[:, 1]]).sum(axis=1)
    assert dense["lee50"]["score"] == pytest.approx(scipy.stats.spearmanr(cosines, lee.scores).statistic, abs=1e-12)
    # Every other row is the score of its own method at its own size: truncation, or the head saved for it.
    for r in rows:
        task = TASKS[r["task"]]
        if r["method"] != "dense":
            represent = _representation(Path(config.out) / "heads" / task.training_set, r["method"], r["size"])
            assert r["score"] == score(task, suite.data[task.dataset], represent)[0][task.metric], (r["task"], r["method"], r["size"])
    sparse = [r for r in rows if r["method"] in ("csr", "csrv2-linear")]
    assert all(r["active_dims"] <= r["size"] and 0 <= r["dead_latents_pct"] <= 100 for r in sparse)
    assert results["settings"]["data_sizes"]["news-retrieval"] == {"train_pairs": 48, "test_pairs": 24}
    out = Path(config.out)
    for name in ("results.json", "results.md", "score_vs_k.png", "dead_latents_vs_k.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["rows"] == every


def test_rerun_reuses_heads_and_rows_and_redoes_only_what_is_missing(suite_run):
    config, results, _ = suite_run
    out = Path(config.out)
    infos = sorted(out.glob("heads/*/*/train_info.json"))
    stamps = {p: p.stat().st_mtime_ns for p in infos}
    removed_row = next(out.glob("rows/bbc-news/csrv2-linear-2-*.json"))
    removed_row.unlink()
    removed_head = next(p for p in infos if p.parent.name.startswith("csrv2-linear-k2") and "bbc-news" in str(p))
    removed_head.unlink()  # as if interrupted after the weights, before the head was marked finished
    again = reproduce(config, progress=False)

    def untimed(rows):
        return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]

    assert untimed(again["rows"]) == untimed(results["rows"])  # seeded CPU training: the same head, the same scores
    changed = [p for p in infos if p.stat().st_mtime_ns != stamps.get(p)]
    assert changed == [removed_head]


def test_reproduce_runs_the_end_to_end_methods_on_request(tmp_path):
    config = SuiteConfig(tasks=("digits", "bbc-news"), methods=("csrv2-linear", "csrv2-full", "mrl-finetuned"), k=(2, 4),
                         finetune_k=(2, 4), max_train=24, max_test=12, epochs=1, finetune_epochs=1, finetune_batch_size=12,
                         max_seq_length=16, image_size=32, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), device="cpu")
    every = reproduce(config, progress=False)["rows"]
    rows = [r for r in every if r["protocol"] == "same-k"]
    assert [(r["task"], r["method"], r["size"]) for r in rows] == [
        (t, m, k) for t in ("digits", "bbc-news") for m in ("csrv2-linear", "csrv2-full", "mrl-finetuned") for k in (2, 4)]
    assert {r["method"] for r in every if r["protocol"] == "asymmetric"} == {"csrv2-linear", "csrv2-full"}  # the sparse heads
    full = [r for r in rows if r["method"] == "csrv2-full"]
    assert all(r["active_dims"] <= r["size"] and r["train_steps"] == 2 and 0 <= r["score"] <= 1 for r in full)
    models = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "run" / "models" / "bbc-news").iterdir())
    assert models == ["csrv2-full-k2", "csrv2-full-k4", "mrl-finetuned"]  # one Matryoshka backbone serves every prefix
    # scored on embeddings of the finetuned backbones, which differ from the frozen one's
    linear = {(r["task"], r["size"]): r["score"] for r in rows if r["method"] == "csrv2-linear"}
    assert any(r["score"] != linear[r["task"], r["size"]] for r in full)
    assert reproduce(config, progress=False)["rows"] == every  # a rerun reuses the models and rows


def test_reproduce_can_start_the_full_method_from_the_linear_head(tmp_path):
    config = SuiteConfig(tasks=("bbc-news",), methods=("csrv2-full",), k=(2,), finetune_init="linear", max_train=24, max_test=12,
                         epochs=1, finetune_epochs=1, finetune_batch_size=12, max_seq_length=16, out=str(tmp_path / "run"),
                         cache_dir=str(tmp_path / "cache"), device="cpu")
    rows = reproduce(config, progress=False)["rows"]
    assert [(r["method"], r["size"], r["protocol"]) for r in rows] == [("csrv2-full", 2, "same-k"), ("csrv2-full", 2, "asymmetric")]
    assert len(list((tmp_path / "run" / "heads" / "bbc-news").glob("csrv2-linear-k2-*"))) == 1  # trained first, on the frozen embeddings
    (model,) = (tmp_path / "run" / "models" / "bbc-news").iterdir()
    assert json.loads((model / "csrv2.json").read_text())["started_from_head"] is True
