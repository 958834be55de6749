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
    args = ["embed", "--data", "bbc-news", "--split", "test", "--max-rows", "6", "--max-seq-length", "32", "--out", str(out),
            "--no-progress"]
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


def test_files_that_are_not_utf8_are_one_line(tmp_path, capsys):
    for name, body in (("bad.jsonl", b'{"text": "caf\xe9", "label": "a"}\n'), ("bad.csv", b"text,label\ncaf\xe9,a\n")):
        (tmp_path / name).write_bytes(body)
        assert main(["embed", "--data", str(tmp_path / name), "--out", str(tmp_path / "x.npz")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err and "UTF-8" in err, err
    assert not (tmp_path / "x.npz").exists()


def test_an_npz_out_that_is_a_folder_is_refused_before_embedding(tmp_path, capsys, monkeypatch):
    import csrv2.data.embed

    monkeypatch.setattr(csrv2.data.embed, "embed_source", lambda *a, **k: pytest.fail("embedded before the output was checked"))
    (tmp_path / "x.npz").mkdir()
    assert main(["embed", "--data", "bbc-news", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.npz: is a folder" in err


def test_embed_to_returns_the_arrays_and_the_shard_count(tmp_path):
    from csrv2.data.embed import embed_to

    table = tmp_path / "t.csv"
    table.write_text("text,label\nhello there,a\ngood night,b\n")
    arrays, shards = embed_to(tmp_path / "one.npz", str(table), max_seq_length=16, progress=False)
    assert shards == 0 and arrays["embeddings"].shape == (2, 384) and list(arrays["labels"]) == ["a", "b"]
    arrays, shards = embed_to(tmp_path / "dir", str(table), max_seq_length=16, progress=False)
    assert shards == 1 and sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["embeddings-00000.npy", "labels-00000.npy"]
    with pytest.raises(ValueError, match="already holds shards"):
        embed_to(tmp_path / "dir", str(table), max_seq_length=16, progress=False)
    embed_to(tmp_path / "dir", str(table), max_seq_length=16, progress=False, overwrite=True)
    np.testing.assert_array_equal(np.load(tmp_path / "dir" / "embeddings-00000.npy"), np.load(tmp_path / "one.npz")["embeddings"])
