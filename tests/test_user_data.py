"""`csrv2 reproduce --data`: the user's tables (embedded by the packaged MiniLM) and embeddings files as tasks of the suite."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import csrv2.eval.suite as suite_module
from csrv2.cli import main
from csrv2.errors import InputError
from csrv2.eval.suite import SuiteConfig, reproduce
from csrv2.eval.user_data import load_user_data
from csrv2.trainer import Trainer

TOPICS = {"sport": ["the team won the match", "a late goal in the final", "the runner broke the record", "fans cheered the keeper"],
          "food": ["bake the bread for an hour", "a soup of fresh tomatoes", "the chef salted the pasta", "sweet apple pie with cream"],
          "money": ["the bank raised its rates", "shares fell on the market", "the budget deficit grew", "investors sold their bonds"]}


def _texts() -> list[tuple[str, str]]:
    """24 short distinct (text, label) rows in 3 classes."""
    return [(f"{text} {suffix}", label) for label, texts in TOPICS.items() for text in texts for suffix in ("today", "again")]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _embeddings_npz(path: Path, dim: int = 24, n: int = 40, **extra) -> Path:
    """n embeddings of `dim` dims around 4 class centres, with their labels."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 4
    x = np.eye(dim, dtype=np.float32)[labels] + 0.05 * rng.normal(size=(n, dim)).astype(np.float32)
    np.savez(path, **{"embeddings": x, "labels": labels, **extra})
    return path


def _config(tmp_path: Path, data: tuple[str, ...], **fields) -> SuiteConfig:
    return SuiteConfig(**{"tasks": (), "data": data, "methods": ("dense", "csrv2-linear"), "k": (2,), "epochs": 1, "device": "cpu",
                          "max_seq_length": 16, "out": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), **fields})


@pytest.fixture
def fits(monkeypatch):
    """Counts the sparse heads trained."""
    counts = {"fit": 0}
    fit = Trainer.fit

    def counted(self):
        counts["fit"] += 1
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", counted)
    return counts


def test_a_labelled_csv_gives_classification_and_clustering_and_a_rerun_reuses_its_rows(tmp_path, fits):
    path = _write_csv(tmp_path / "topics.csv", [{"text": t, "label": y} for t, y in _texts()])
    split = load_user_data(str(path))
    assert (len(split.train_texts), len(split.test_texts)) == (19, 5)  # a seeded 20% of the 24 texts
    assert not set(split.train_texts) & set(split.test_texts)
    results = reproduce(_config(tmp_path, (str(path),)), progress=False)
    assert [(r["task"], r["method"], r["size"], r["protocol"]) for r in results["rows"]] == [
        (task, method, size, protocol) for task in ("topics", "topics-clustering")
        for method, size, protocol in (("dense", 384, "same-k"), ("csrv2-linear", 2, "same-k"), ("csrv2-linear", 2, "asymmetric"))]
    assert results["settings"]["data_sizes"] == {"topics": {"train": 19, "test": 5}}
    assert fits["fit"] == 1  # the clustering task shares the classification task's head
    assert {r["metric"] for r in results["rows"]} == {"accuracy", "v_measure"}
    assert all((tmp_path / "run" / name).is_file() for name in ("results.json", "results.md", "score_vs_k.png", "dead_latents_vs_k.png"))
    assert "topics-clustering" in (tmp_path / "run" / "results.md").read_text()
    again = reproduce(_config(tmp_path, (str(path),)), progress=False)
    assert fits["fit"] == 1 and again["rows"] == results["rows"]  # every row and head reused


def test_a_split_column_is_honoured_and_a_text_on_both_sides_is_never_scored(tmp_path):
    rows = [{"text": t, "label": y, "split": "test" if i % 4 == 0 else "train"} for i, (t, y) in enumerate(_texts())]
    rows.append({"text": rows[1]["text"], "label": rows[1]["label"], "split": "test"})  # also in train: test drops it
    data = load_user_data(str(_write_csv(tmp_path / "given.csv", rows)))
    assert data.test_texts == [r["text"] for r in rows[:-1] if r["split"] == "test"]
    assert data.train_texts == [r["text"] for r in rows if r["split"] == "train"]
    capped = load_user_data(str(tmp_path / "given.csv"), max_train=10, max_test=2)
    assert (len(capped.train_texts), len(capped.test_texts)) == (10, 2) and set(capped.train_texts) <= set(data.train_texts)
    rows[3]["split"] = "dev"
    with pytest.raises(InputError, match=r"row 4 has split 'dev'; write train or test"):
        load_user_data(str(_write_csv(tmp_path / "dev.csv", rows)))


def test_a_pairs_jsonl_gives_a_retrieval_row(tmp_path, monkeypatch):
    monkeypatch.setattr(suite_module, "plot_results", lambda results, out: None)
    path = tmp_path / "faq.jsonl"
    path.write_text("".join(json.dumps({"q": f"what about {t}?", "a": f"{t}, as the notes say."}) + "\n" for t, _ in _texts()))
    results = reproduce(_config(tmp_path, (str(path),), pairs=True, query_column="q", document_column="a", methods=("dense",)),
                        progress=False)
    (row,) = results["rows"]
    assert (row["task"], row["kind"], row["metric"], row["size"]) == ("faq", "retrieval", "ndcg@10", 384)
    assert 0 < row["score"] <= 1 and results["settings"]["data_sizes"] == {"faq": {"train_pairs": 19, "test_pairs": 5}}


def test_embeddings_of_another_dimension_run_without_the_backbone(tmp_path, monkeypatch, fits):
    monkeypatch.setattr(suite_module, "plot_results", lambda results, out: None)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone embedded something")

    monkeypatch.setattr(suite_module, "embed_dataset", no_backbone)
    path = _embeddings_npz(tmp_path / "vectors.npz")
    config = _config(tmp_path, (str(path),), methods=("dense", "mrl-truncate", "mrl-linear", "csrv2-linear"), k=(2, 32))
    rows = [r for r in reproduce(config, progress=False)["rows"] if r["protocol"] == "same-k" and r["task"] == "vectors"]
    # MRL prefixes wider than the 24 dims are left out; the sparse heads have 4 x 24 latents, so k = 32 fits
    assert [(r["method"], r["size"]) for r in rows] == [("dense", 24), ("mrl-truncate", 2), ("mrl-linear", 2), ("csrv2-linear", 2),
                                                        ("csrv2-linear", 32)]
    assert rows[0]["score"] == 1.0 and rows[0]["active_dims"] == 24 and fits["fit"] == 2
    heads = sorted((tmp_path / "run" / "heads" / "vectors").glob("csrv2-linear-k32-*"))
    assert json.loads((heads[0] / "config.json").read_text())["hidden_dim"] == 96


def test_retrieval_pairs_of_embeddings(tmp_path, monkeypatch):
    monkeypatch.setattr(suite_module, "plot_results", lambda results, out: None)
    queries = np.random.default_rng(2).normal(size=(30, 12)).astype(np.float32)
    np.savez(tmp_path / "pairs.npz", queries=queries, documents=queries + 0.01)
    (row,) = reproduce(_config(tmp_path, (str(tmp_path / "pairs.npz"),), methods=("dense",)), progress=False)["rows"]
    assert (row["task"], row["metric"], row["size"], row["score"]) == ("pairs", "ndcg@10", 12, 1.0)


@pytest.mark.parametrize("make, fields, message", [
    (lambda p: _write_csv(p / "t.csv", [{"text": t, "topic": y} for t, y in _texts()]), {}, r"no column 'label'; its columns are"),
    (lambda p: _write_csv(p / "t.csv", [{"text": t, "label": "one"} for t, _ in _texts()]), {}, r"has 1 class\(es\); classification needs"),
    (lambda p: (p / "t.csv").write_text("") and None or p / "t.csv", {}, "the file is empty"),
    (lambda p: np.savez(p / "e.npz", embeddings=np.ones((8, 4), np.float32)) or p / "e.npz", {}, "holds embeddings without labels"),
    (lambda p: np.savez(p / "e.npz", embeddings=np.array([object()] * 3, dtype=object)) or p / "e.npz", {}, "pickled"),
    (lambda p: _embeddings_npz(p / "e.npz", embeddings=np.full((40, 24), np.nan, np.float32)), {}, "row 0 has NaN"),
    (lambda p: p / "missing.csv", {}, "no such file"),
    (lambda p: _write_csv(p / "bbc-news.csv", [{"text": t, "label": y} for t, y in _texts()]), {}, "is a packaged data set"),
    (lambda p: _embeddings_npz(p / "e.npz"), {"methods": ("dense", "csrv2-full")}, "holds embeddings, and csrv2-full"),
])
def test_bad_inputs_say_what_is_wrong_in_one_line(tmp_path, make, fields, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as error:
        suite_module.Suite(_config(tmp_path, (str(path),), **fields), progress=False).run()
    assert "\n" not in str(error.value)


def test_the_cli_runs_user_data_alone_or_beside_named_tasks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite_module, "plot_results", lambda results, out: None)
    path = _embeddings_npz(tmp_path / "vectors.npz")
    common = ["--methods", "dense", "csrv2-linear", "--k", "2", "--epochs", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
              "--no-progress"]
    assert main(["reproduce", "--data", str(path), "--out", str(tmp_path / "run"), *common]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {r["task"] for r in results["rows"]} == {"vectors", "vectors-clustering"} and results["settings"]["data"] == [str(path)]
    assert "vectors-clustering" in capsys.readouterr().out
    monkeypatch.setattr(suite_module, "load_dataset", lambda name, **sizes: name)  # a named packaged task, from hand-made embeddings
    digits = suite_module.EmbeddedSet("digits", *[np.asarray(a) for a in (np.eye(8)[np.arange(16) % 4], np.eye(8)[np.arange(8) % 4])],
                                      np.arange(16) % 4, np.arange(8) % 4)
    monkeypatch.setattr(suite_module, "embed_dataset", lambda dataset, backbone, cache, progress=True: digits)
    assert main(["reproduce", "--data", str(path), "--tasks", "digits", "--out", str(tmp_path / "both"), *common]) == 0
    rows = json.loads((tmp_path / "both" / "results.json").read_text())["rows"]
    assert list(dict.fromkeys(r["task"] for r in rows)) == ["digits", "vectors", "vectors-clustering"]
    assert main(["reproduce", "--data", str(tmp_path / "nothing.npz"), "--out", str(tmp_path / "bad"), *common]) == 2
    assert "nothing.npz: no such file" in capsys.readouterr().err


def test_validation_holds_out_part_of_the_users_train_split(tmp_path, monkeypatch):
    monkeypatch.setattr(suite_module, "plot_results", lambda results, out: None)
    path = _embeddings_npz(tmp_path / "vectors.npz")
    results = reproduce(_config(tmp_path, (str(path),), methods=("dense",), validation=True), progress=False)
    assert results["settings"]["data_sizes"] == {"vectors": {"train": 26, "validation": 6}}  # 20% of the 32 train rows; test unused
    assert [r["task"] for r in results["rows"]] == ["vectors", "vectors-clustering"]


def test_npy_embeddings_take_their_labels_from_labels(tmp_path, monkeypatch):
    monkeypatch.setattr(suite_module, "plot_results", lambda results, out: None)
    with np.load(_embeddings_npz(tmp_path / "vectors.npz")) as f:
        np.save(tmp_path / "x.npy", f["embeddings"])
        np.save(tmp_path / "y.npy", f["labels"])
    config = _config(tmp_path, (str(tmp_path / "x.npy"),), methods=("dense",), labels=str(tmp_path / "y.npy"))
    rows = reproduce(config, progress=False)["rows"]
    assert [(r["task"], r["size"]) for r in rows] == [("x", 24), ("x-clustering", 24)]
    with pytest.raises(InputError, match="holds embeddings without labels"):
        reproduce(_config(tmp_path, (str(tmp_path / "x.npy"),), out=str(tmp_path / "other")), progress=False)
