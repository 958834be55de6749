"""`csrv2 embed`: packaged splits and user files to training files, through the cache; bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from csrv2.cli import main
from csrv2.data import load_training_data


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CSRV2_CACHE", str(tmp_path / "cache"))


def test_packaged_split_becomes_a_training_file(tmp_path, capsys):
    out = tmp_path / "bbc.npz"
    args = ["embed", "--data", "bbc-news", "--split", "test", "--max-rows", "6", "--max-seq-length", "32", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "embeddings (6, 384), labels (6,)" in capsys.readouterr().out
    data = load_training_data(out)
    assert data.embeddings.shape == (6, 384) and data.labels is not None
    first = np.load(out)["embeddings"]
    assert main(args) == 0  # the second run reads the cache: one entry, same vectors
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.npy"))) == 1
    np.testing.assert_array_equal(np.load(out)["embeddings"], first)


def test_pairs_file_gives_queries_and_documents(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"q": f"question {i}", "d": f"answer number {i}"}) for i in range(3)))
    out = tmp_path / "pairs.npz"
    assert main(["embed", "--data", str(pairs), "--pairs", "--query-column", "q", "--document-column", "d",
                 "--max-seq-length", "16", "--out", str(out), "--no-progress"]) == 0
    data = load_training_data(out)
    assert data.embeddings.shape == data.documents.shape == (3, 384)


def test_bad_inputs_say_what_to_do(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("body,topic\nhello,a\n")
    assert main(["embed", "--data", str(table), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text" in err and "body" in err and "topic" in err  # names the columns that exist
    assert main(["embed", "--data", "no-such-set", "--out", str(tmp_path / "x.npz")]) == 2
    assert "neither a packaged data set" in capsys.readouterr().err
    assert main(["embed", "--data", str(table), "--text-column", "body", "--label-column", "topic", "--out", str(tmp_path / "x.npy")]) == 2
    assert "give a path ending in .npz" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()
