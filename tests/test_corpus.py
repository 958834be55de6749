"""Text search: an index built from texts keeps its backbone's identity and texts; queries are embedded the same way."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from csrv2.cli import main
from csrv2.data.backbones import TextBackbone
from csrv2.data.cache import EmbeddingCache
from csrv2.errors import InputError
from csrv2.model import save_head
from csrv2.search.index import InvertedIndex
from csrv2.search.texts import build_text_index, query_backbone, read_texts, search_texts, texts_path

DOCS = [
    "The central bank raised interest rates again to fight inflation.",
    "A striker scored twice as the home team won the cup final.",
    "The new phone has a faster chip and a brighter screen.",
    "Heavy rain flooded the valley and closed several roads.",
]


@pytest.fixture(scope="module")
def backbone():
    return TextBackbone(max_seq_length=32)


@pytest.fixture
def head(make_head):
    return make_head(input_dim=384, hidden_dim=256, k=8, zero_biases=True)


def test_identical_text_finds_its_document_and_texts_ride_along(tmp_path, backbone, head):
    out = tmp_path / "news.index"
    index = build_text_index(head, backbone, DOCS, out, cache=EmbeddingCache(tmp_path / "cache"), progress=False)
    assert len(InvertedIndex.open(out)) == 4
    info = read_texts(out, index)
    assert info["texts"] == DOCS and info["identity"] == backbone.identity
    for options in ({}, {"dense": True}):  # a query code wider than the documents', and a dense query
        assert search_texts(index, head, backbone, [DOCS[2], DOCS[0]], top_n=2, **options)[0][:, 0].tolist() == [2, 0]
    ids, scores = search_texts(index, head, backbone, [DOCS[2], DOCS[0]], top_n=2, k=head.config.k)
    assert ids[:, 0].tolist() == [2, 0]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=2e-3)  # cosine of a code with itself (float16 postings)


def test_another_backbone_is_refused(tmp_path, backbone, head):
    out = tmp_path / "i"
    build_text_index(head, backbone, DOCS, out, cache=EmbeddingCache(tmp_path / "cache"), progress=False)
    info = read_texts(out, InvertedIndex.open(out))
    assert query_backbone(info, None, None).identity == backbone.identity  # the index's own, max_seq_length included
    with pytest.raises(InputError, match="is not the one that embedded this index"):
        query_backbone(info, None, 64)
    with pytest.raises(InputError, match="holds no texts"):
        query_backbone(None, None, None)


def test_another_head_is_refused(tmp_path, backbone, head, make_head):
    out = tmp_path / "i"
    build_text_index(head, backbone, DOCS, out, cache=EmbeddingCache(tmp_path / "cache"), progress=False)
    index = InvertedIndex.open(out)
    assert index.head_digest == head.digest()[:32]  # recorded in the index file
    other = make_head(input_dim=384, hidden_dim=256, k=8, seed=1, zero_biases=True)  # same shapes, other weights
    with pytest.raises(InputError, match="this index was built with another head"):
        search_texts(index, other, backbone, [DOCS[0]])
    assert search_texts(index, head, backbone, [DOCS[0]], top_n=1)[0].tolist() == [[0]]


def test_texts_file_must_match_the_index(tmp_path, backbone, head):
    out = tmp_path / "i"
    index = build_text_index(head, backbone, DOCS, out, cache=EmbeddingCache(tmp_path / "cache"), progress=False)
    texts_path(out).write_text('{"texts": ["only one"]}')
    with pytest.raises(InputError, match="holds 1 texts but the index 4 vectors"):
        read_texts(out, index)
    texts_path(out).write_text("{not json")
    with pytest.raises(InputError, match="damaged"):
        read_texts(out, index)


def test_cli_builds_from_a_table_and_searches_by_text(tmp_path, head, capsys, monkeypatch):
    monkeypatch.setenv("CSRV2_CACHE", str(tmp_path / "cache"))
    save_head(head, tmp_path / "model")
    table = tmp_path / "docs.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["body"])
        writer.writerows([d] for d in DOCS)
    index = str(tmp_path / "docs.index")
    base = ["--model", str(tmp_path / "model"), "--no-progress"]
    assert main(["index", "build", *base, "--data", str(table), "--text-column", "body", "--max-seq-length", "32", "--out", index]) == 0
    assert main(["search", "--index", index, *base, DOCS[1]]) == 0
    out = capsys.readouterr().out
    assert "1. id 1 (" in out and "A striker scored twice" in out
    assert main(["search", "--index", index, *base, "--max-seq-length", "64", "rain"]) == 2
    assert "is not the one that embedded this index" in capsys.readouterr().err
    assert main(["search", "--index", index, *base]) == 2
    assert "give query texts or --queries" in capsys.readouterr().err


def test_cli_indexes_and_searches_with_a_sparse_encoder_folder(tmp_path, head, capsys, monkeypatch):
    from csrv2.export import export_sparse_encoder

    monkeypatch.setenv("CSRV2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export_sparse_encoder(head, tmp_path / "encoder", TextBackbone(max_seq_length=32))  # as csrv2 finetune writes it
    table = tmp_path / "docs.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["text"], *([d] for d in DOCS)])
    index = str(tmp_path / "docs.index")
    base = ["--model", str(tmp_path / "encoder"), "--no-progress"]
    assert main(["index", "build", *base, "--data", str(table), "--out", index]) == 0
    assert main(["search", "--index", index, *base, DOCS[2]]) == 0
    assert "1. id 2 (" in capsys.readouterr().out  # its own backbone embedded both sides
    assert main(["search", "--index", index, *base, "--backbone", "all-MiniLM-L6-v2", "rain"]) == 2
    assert "brings its own backbone" in capsys.readouterr().err
