"""End-to-end training on a tiny slice, on CPU: the backbone learns, and the result loads as a SparseEncoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import csrv2
from csrv2.backbone import TextBackbone
from csrv2.config import TrainConfig
from csrv2.errors import InputError
from csrv2.finetune import FinetuneConfig, finetune_text

TEXTS = ["Shares fell as the bank cut rates.", "The striker scored twice.", "Profits rose at the car maker.",
         "The keeper saved a late penalty.", "Markets rallied on the news.", "The home side won the cup."]
LABELS = np.array(["business", "sport", "business", "sport", "business", "sport"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "model"
    backbone = TextBackbone(max_seq_length=16)
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    trained, head = finetune_text(backbone, TEXTS, LABELS, k=2, hidden_dim=64,
                                  train=TrainConfig(epochs=2, batch_size=2, lr=1e-3, device="cpu"),
                                  finetune=FinetuneConfig(backbone_lr=1e-4, grad_accum=2), out=out, progress=False)
    return before, trained, head, out


def test_backbone_and_head_both_learn(run):
    before, trained, head, _ = run
    unchanged = [n for n, p in trained.model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == ["0.model.pooler.dense.weight", "0.model.pooler.dense.bias"]  # BERT's pooler: unused by mean pooling
    codes = csrv2.encode(head, trained.embed(TEXTS, progress=False), progress=False)
    assert codes.indices.shape == (6, 2) and (codes.values >= 0).all()


def test_result_is_a_sparse_encoder_with_the_same_codes(run, monkeypatch):
    from sentence_transformers import SparseEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, trained, head, out = run
    theirs = SparseEncoder(str(out), device="cpu").encode(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False).to_dense()
    ours = torch.from_numpy(csrv2.encode(head, trained.embed(TEXTS, progress=False), progress=False).to_dense())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_bad_inputs(tmp_path):
    backbone = TextBackbone(max_seq_length=16)
    with pytest.raises(InputError, match="one per text"):
        finetune_text(backbone, TEXTS, LABELS[:3], progress=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="already exists"):
        finetune_text(backbone, TEXTS, LABELS, out=tmp_path / "taken", progress=False)
    with pytest.raises(ValueError, match="grad_accum"):
        FinetuneConfig(grad_accum=0)


def test_cli_finetune_writes_a_sparse_encoder(tmp_path, capsys):
    import csv

    from csrv2.cli import main

    table = tmp_path / "news.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([("body", "topic"), *zip(TEXTS, LABELS)])
    out = tmp_path / "model"
    args = ["finetune", "--data", str(table), "--text-column", "body", "--label-column", "topic", "--k", "2",
            "--hidden-dim", "32", "--epochs", "1", "--batch-size", "3", "--max-seq-length", "16", "--device", "cpu",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert (out / "modules.json").is_file() and "k = 2" in capsys.readouterr().out
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
