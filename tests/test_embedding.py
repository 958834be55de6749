"""`csrv2 embed`: packaged splits and user files to training files, through the cache; bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from csrv2.cli import main
from csrv2.data.training import load_training_data


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
    assert "give a path ending in .npz, or a folder" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_a_folder_out_gets_shards_that_train_reads_as_one_array(tmp_path, capsys):
    from csrv2.data.training import ShardedArray

    args = ["embed", "--data", "bbc-news", "--split", "test", "--max-rows", "6", "--max-seq-length", "32", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one.npz")]) == 0
    assert main([*args, "--out", str(tmp_path / "shards")]) == 0
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["embeddings-00000.npy", "labels-00000.npy"]
    assert main([*args, "--out", str(tmp_path / "shards")]) == 2 and "already holds shards" in capsys.readouterr().err
    # a second shard, as a second rank writes it: the folder reads as the rows of both, in shard order
    whole = np.load(tmp_path / "one.npz")
    np.save(tmp_path / "shards" / "embeddings-00001.npy", whole["embeddings"][:2])
    np.save(tmp_path / "shards" / "labels-00001.npy", whole["labels"][:2])
    data = load_training_data(tmp_path / "shards")
    assert isinstance(data.embeddings, ShardedArray) and data.embeddings.shape == (8, 384)
    expected = np.concatenate([whole["embeddings"], whole["embeddings"][:2]])
    rows = np.array([7, 0, 5, 6])
    np.testing.assert_array_equal(data.embeddings[rows], expected[rows])
    np.testing.assert_array_equal(data.embeddings[2:8], expected[2:8])
    assert len(data.labels) == 8
    (tmp_path / "shards" / "labels-00001.npy").unlink()
    with pytest.raises(ValueError, match="labels-00001.npy is missing"):
        load_training_data(tmp_path / "shards")
