"""The sentence-transformers format: SparseEncoder(path) loads an export and gives csrv2's codes; csrv2 reads such folders back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import csrv2
from csrv2.data.backbones import TextBackbone, resolve_text_model
from csrv2.errors import InputError
from csrv2.eval.metrics import retrieval_metrics
from csrv2.export import export_sparse_encoder, read_sparse_encoder, sparse_encoder_similarity

TEXTS = ["Stocks fell as the bank cut its forecast.", "The striker scored twice in the final.",
         "A new phone with a faster chip.", "Rain closed the valley roads.", "Rates rose again.", "The cup went to the home side."]
# (query, document): news titles and their articles, several per topic so that retrieval has near misses.
PAIRS = [
    ("Bank cuts growth forecast", "The central bank lowered its growth forecast for next year, citing weak exports."),
    ("Stocks slide on rate fears", "Share prices fell sharply as traders bet that interest rates would rise again."),
    ("Oil prices jump", "Crude oil rose five percent after producers agreed to cut output."),
    ("Housing market cools", "House prices dropped for a third month as mortgage costs climbed."),
    ("Retailer posts record profit", "The supermarket chain reported its highest annual profit on strong holiday sales."),
    ("Airline strike grounds flights", "Hundreds of flights were cancelled as pilots walked out over pay."),
    ("Striker scores twice in final", "The forward netted two goals to win the cup final for the home side."),
    ("Tennis champion retires", "The former world number one announced her retirement after twenty seasons."),
    ("Marathon record broken", "A Kenyan runner set a new marathon world record in Berlin on Sunday."),
    ("Coach sacked after losing run", "The club dismissed its manager after eight defeats in a row."),
    ("Cricket team wins series", "The visitors clinched the test series with a win on the final day."),
    ("Cyclist crashes out of tour", "The race leader broke his collarbone in a crash on the mountain stage."),
    ("New phone has faster chip", "The company unveiled a smartphone with a quicker processor and a better camera."),
    ("Hackers steal customer data", "Criminals broke into the retailer's systems and took millions of card numbers."),
    ("Electric car sales surge", "Sales of battery vehicles doubled this year as prices fell."),
    ("Space probe reaches Jupiter", "The robotic spacecraft entered orbit around the giant planet after a five-year trip."),
    ("Social network fined", "Regulators fined the platform for mishandling users' personal information."),
    ("Chip maker opens factory", "A semiconductor plant worth billions opened, creating thousands of jobs."),
    ("Floods close valley roads", "Heavy rain flooded the valley and closed several roads overnight."),
    ("Heatwave breaks records", "Temperatures hit an all-time high as the heatwave entered its second week."),
    ("Storm cuts power to thousands", "High winds brought down lines and left thousands of homes without electricity."),
    ("Drought hits farmers", "A dry summer has ruined crops and forced farmers to sell livestock."),
    ("Snow disrupts trains", "Heavy snowfall caused delays and cancellations across the rail network."),
    ("Wildfire forces evacuations", "Residents fled their homes as a wildfire spread through the hills."),
    ("Minister resigns over scandal", "The health minister stepped down after leaked emails surfaced."),
    ("Election date announced", "The prime minister called a general election for early spring."),
    ("Parliament passes budget", "Lawmakers approved the spending plan after a long late-night debate."),
    ("Museum reopens after repairs", "The art museum welcomed visitors again after two years of restoration."),
    ("Film wins top festival prize", "The drama took the festival's main award on its closing night."),
    ("Band announces world tour", "The rock group will play forty cities on a tour starting in June."),
    ("Author wins book prize", "The novelist won the literary award for her debut about a fishing village."),
    ("Chef opens new restaurant", "The celebrity chef opened a seafood restaurant in the old harbour."),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny head trained on MiniLM embeddings of six texts, and its export."""
    backbone = TextBackbone(max_seq_length=32)
    x = backbone.embed(TEXTS, progress=False)
    head = csrv2.train(x, np.array([0, 1, 2, 3, 0, 1]), k=4, hidden_dim=64, epochs=3, batch_size=4, progress=False)
    out = tmp_path_factory.mktemp("export") / "minilm-csrv2"
    export_sparse_encoder(head, out, backbone, settings={"note": "test"})
    return backbone, head, x, out


def test_sparse_encoder_loads_the_export_and_gives_csrv2_codes(trained, monkeypatch):
    from sentence_transformers import SparseEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone, head, x, out = trained
    model = SparseEncoder(str(out), device="cpu")
    theirs = model.encode(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False).to_dense()
    ours = torch.from_numpy(csrv2.encode(head, x, progress=False).to_dense())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs != 0).sum(dim=1).max() <= 4
    # asymmetric search there: queries with more latents than the documents' k, as csrv2 codes them
    wide = model.encode_query(TEXTS, max_active_dims=32, convert_to_tensor=True, convert_to_sparse_tensor=False).to_dense()
    torch.testing.assert_close(wide, torch.from_numpy(csrv2.encode(head, x, 32, progress=False).to_dense()), atol=1e-5, rtol=0)
    assert (wide != 0).sum(dim=1).max() > 4


@pytest.fixture(scope="module")
def retrieval(trained):
    """A head trained in about a second on the pairs loss of PAIRS' MiniLM embeddings, its export and its codes' nDCG@10."""
    backbone = trained[0]
    queries, documents = (backbone.embed([pair[i] for pair in PAIRS], progress=False) for i in (0, 1))
    head = csrv2.train(queries, documents=documents, k=4, hidden_dim=128, epochs=10, batch_size=8, device="cpu", progress=False)
    out = trained[3].parent / "retrieval"
    export_sparse_encoder(head, out, backbone)
    codes = [csrv2.encode(head, x, progress=False).to_scipy() for x in (queries, documents)]
    # each query shares a latent with its document: ties at 0, which the two rankings break differently, do not reach it
    assert (codes[0].multiply(codes[1]).sum(axis=1) > 0).all()
    return out, retrieval_metrics(*codes)["ndcg@10"]


def test_the_export_is_scored_by_cosine_as_csrv2_scores_it(retrieval, monkeypatch, tmp_path):
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, ours = retrieval
    model = SparseEncoder(str(out), device="cpu")
    assert model.similarity_fn_name == "cosine" and sparse_encoder_similarity(out) == "cosine"
    queries, documents = ({f"{side}{i}": pair[j] for i, pair in enumerate(PAIRS)} for j, side in enumerate("qd"))
    evaluator = SparseInformationRetrievalEvaluator(queries, documents, {f"q{i}": {f"d{i}"} for i in range(len(PAIRS))})
    theirs = evaluator(model)
    assert theirs["cosine_ndcg@10"] == pytest.approx(ours, abs=1e-9)
    model.similarity_fn_name = "dot"  # what sentence-transformers uses for a folder that names no similarity
    assert evaluator(model)["dot_ndcg@10"] != pytest.approx(ours, abs=1e-3)  # so the similarity decides the score here
    unnamed = tmp_path / "unnamed"
    shutil.copytree(out, unnamed)
    config = json.loads((unnamed / "config_sentence_transformers.json").read_text())
    del config["similarity_fn_name"]
    (unnamed / "config_sentence_transformers.json").write_text(json.dumps(config))
    assert sparse_encoder_similarity(unnamed) == SparseEncoder(str(unnamed), device="cpu").similarity_fn_name == "dot"


def test_export_keeps_the_six_keys_and_csrv2_settings_apart(trained):
    _, head, _, out = trained
    modules = json.loads((out / "modules.json").read_text())
    config = json.loads((out / modules[-1]["path"] / "config.json").read_text())
    assert config == head.config.to_dict() and len(config) == 6
    assert json.loads((out / "csrv2.json").read_text())["note"] == "test"


def test_csrv2_reads_the_folder_back(trained):
    backbone, head, x, out = trained
    backbone2, head2 = read_sparse_encoder(out)
    for (name, a), (_, b) in zip(head.named_parameters(), head2.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    np.testing.assert_allclose(backbone2.embed(TEXTS, progress=False), x, atol=1e-6)


def test_existing_folder_needs_overwrite_and_is_replaced_whole(trained, tmp_path):
    backbone, head, _, _ = trained
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        export_sparse_encoder(head, out, backbone)
    assert (out / "keep.txt").read_text() == "mine"
    export_sparse_encoder(head, out, backbone, overwrite=True)
    assert (out / "modules.json").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary or old folder left


def test_foreign_folders_are_refused(trained, tmp_path):
    _, _, _, out = trained
    with pytest.raises(InputError, match="no readable modules.json"):
        read_sparse_encoder(tmp_path)
    with pytest.raises(InputError, match="not a SparseAutoEncoder"):
        read_sparse_encoder(resolve_text_model(None)[0])  # a dense sentence-transformers model
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    module = json.loads((bad / "modules.json").read_text())[-1]["path"]
    config = json.loads((bad / module / "config.json").read_text())
    (bad / module / "config.json").write_text(json.dumps({**config, "topk_mode": "batch"}))
    with pytest.raises(InputError, match="not a sparse head's"):
        read_sparse_encoder(bad)


def test_cli_export(trained, tmp_path, capsys):
    from csrv2.cli import main
    from csrv2.model import save_head

    _, head, _, _ = trained
    save_head(head, tmp_path / "head", {"train": {"epochs": 3}})
    args = ["export", "--model", str(tmp_path / "head"), "--max-seq-length", "32", "--out", str(tmp_path / "st")]
    assert main(args) == 0
    assert json.loads((tmp_path / "st" / "csrv2.json").read_text())["train"] == {"epochs": 3}
    assert main(args) == 2 and "already exists" in capsys.readouterr().err


def test_backbone_with_only_pickled_weights_is_refused(trained, tmp_path):
    _, _, _, out = trained
    bad = tmp_path / "bad"
    transformer = out / json.loads((out / "modules.json").read_text())[0]["path"]
    shutil.copytree(out, bad, ignore=lambda folder, names: ["model.safetensors"] if Path(folder) == transformer else [])
    (bad / transformer.relative_to(out) / "pytorch_model.bin").write_bytes(b"\x80\x04fake pickle")
    with pytest.raises(InputError, match=r"pytorch_model.bin, a pickle.*safe_serialization=True"):
        read_sparse_encoder(bad)


@pytest.mark.parametrize("text", ["{", "{}", '[{"type": "x"}]'])
def test_broken_modules_json_is_one_line(tmp_path, text):
    (tmp_path / "modules.json").write_text(text)
    with pytest.raises(InputError, match="modules.json"):
        read_sparse_encoder(tmp_path)
