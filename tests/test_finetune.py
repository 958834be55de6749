"""End-to-end training on a tiny slice, on CPU: the backbone learns, and the result loads as a SparseEncoder."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import csrv2
from csrv2.config import VISION_RECIPE, TrainConfig
from csrv2.data.backbones import TextBackbone
from csrv2.errors import InputError
from csrv2.finetune import FinetuneConfig, finetune_text
from csrv2.model import read_settings

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
    from csrv2.config import HeadConfig
    from csrv2.data.training import class_ids
    from csrv2.head import SparseHead
    from csrv2.objective import step_losses

    before, trained, head, _ = run
    unchanged = [n for n, p in trained.model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == ["0.model.pooler.dense.weight", "0.model.pooler.dense.bias"]  # BERT's pooler: unused by mean pooling
    assert not trained.model.training and not head.training  # returned ready to embed: no dropout
    codes = csrv2.encode(head, trained.embed(TEXTS, progress=False), progress=False)
    assert codes.indices.shape == (6, 2) and (codes.values >= 0).all()

    # The objective it optimises, on all six texts at the final k: the start (the packaged backbone and the
    # seed's initial head) against the end; and the backbone's share of the gain (the trained head on frozen embeddings).
    frozen = TextBackbone(max_seq_length=16)
    assert all(torch.equal(p, before[n]) for n, p in frozen.model.named_parameters())
    start = SparseHead(HeadConfig(384, 64, 2), torch.Generator().manual_seed(0))
    labels = torch.from_numpy(class_ids(LABELS))

    def objective(backbone, sparse_head) -> float:
        x = torch.from_numpy(backbone.embed(TEXTS, progress=False))
        with torch.no_grad():
            losses, _ = step_losses(sparse_head, x, 2, torch.zeros(64, dtype=torch.bool), TrainConfig(), "supervised", labels)
        return float(losses["loss"])

    end = objective(trained, head)
    assert end < 0.8 * objective(frozen, start)
    assert end < 0.8 * objective(frozen, head)


def test_result_is_a_sparse_encoder_with_the_same_codes(run, monkeypatch):
    from sentence_transformers import SparseEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, trained, head, out = run
    theirs = SparseEncoder(str(out), device="cpu").encode(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False).to_dense()
    ours = torch.from_numpy(csrv2.encode(head, trained.embed(TEXTS, progress=False), progress=False).to_dense())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_bad_inputs(tmp_path):
    backbone = TextBackbone(max_seq_length=16)
    with pytest.raises(InputError, match="one per item"):
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
        csv.writer(f).writerows([("body", "topic"), *zip(TEXTS, LABELS, strict=True)])
    out = tmp_path / "model"
    args = ["finetune", "--data", str(table), "--text-column", "body", "--label-column", "topic", "--k", "2",
            "--hidden-dim", "32", "--epochs", "1", "--batch-size", "3", "--max-seq-length", "16", "--device", "cpu",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert (out / "modules.json").is_file() and "k = 2" in capsys.readouterr().out
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert read_settings(out)["finetune"]["detach_target"] is False  # texts: the recipe measured on them
    assert read_settings(out)["train"]["lr"] == TrainConfig.lr


def test_cli_finetune_on_images_takes_the_vision_recipe(tmp_path):
    from csrv2.cli import main

    out = tmp_path / "model"
    args = ["finetune", "--data", "digits", "--max-rows", "16", "--image-size", "32", "--k", "2", "--hidden-dim", "32",
            "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert {name: read_settings(out)["train"][name] for name in VISION_RECIPE} == VISION_RECIPE
    assert main([*args, "--lr", "1e-3", "--overwrite"]) == 0 and read_settings(out)["train"]["lr"] == 1e-3  # what is given wins


def _cfg(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 2, "lr": 1e-3, "device": "cpu", **kw})


def test_lora_trains_adapters_and_merges_them(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from sentence_transformers import SparseEncoder

    backbone = TextBackbone(max_seq_length=16)
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    trained, head = finetune_text(backbone, TEXTS, LABELS, k=2, hidden_dim=64, train=_cfg(epochs=1),
                                  finetune=FinetuneConfig(backbone_lr=1e-3, lora_rank=4), out=tmp_path / "lora", progress=False)
    after = dict(trained.model.named_parameters())
    assert set(after) == set(before)  # merged: no adapter left in the saved model
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all(".attention.self.query." in n or ".attention.self.value." in n for n in changed)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = SparseEncoder(str(tmp_path / "lora"), device="cpu")
    theirs = encoder.encode(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False).to_dense()
    ours = torch.from_numpy(csrv2.encode(head, trained.embed(TEXTS, progress=False), progress=False).to_dense())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_an_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    options = dict(k=2, hidden_dim=64, train=_cfg(checkpoint_every=2, log_every=1), finetune=FinetuneConfig(backbone_lr=1e-4),
                   progress=False)
    whole, whole_head = finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, out=tmp_path / "whole", **options)

    from csrv2.finetune import Finetuner

    real_step = Finetuner.train_step

    def crash_at_step_5(self, rows, k):
        if self.step == 5:
            raise KeyboardInterrupt
        return real_step(self, rows, k)

    monkeypatch.setattr(Finetuner, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, out=tmp_path / "run", **options)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000000004"]
    monkeypatch.setattr(Finetuner, "train_step", real_step)
    with pytest.raises(InputError, match="other train"):
        finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, out=tmp_path / "run", resume=True,
                      **{**options, "train": _cfg(checkpoint_every=2, log_every=1, lr=2e-3)})
    resumed, resumed_head = finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, out=tmp_path / "run", resume=True, **options)

    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(whole_head.weight, resumed_head.weight, atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7)) and not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(InputError, match="no checkpoint"):
        finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, out=tmp_path / "none", resume=True, **options)


def test_matryoshka_objective_writes_a_sentence_transformer(tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    trained, head = finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, train=_cfg(epochs=1),
                                  finetune=FinetuneConfig(objective="matryoshka", backbone_lr=1e-4, mrl_dims=(2, 8)),
                                  out=tmp_path / "mrl", progress=False)
    assert head is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = SentenceTransformer(str(tmp_path / "mrl"), device="cpu", truncate_dim=8)
    np.testing.assert_allclose(loaded.encode(TEXTS), trained.embed(TEXTS, progress=False)[:, :8], atol=1e-5)
    assert json.loads((tmp_path / "mrl" / "csrv2.json").read_text())["finetune"]["mrl_dims"] == [2, 8]
    with pytest.raises(InputError, match="mrl_dims go up to 512"):
        finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, finetune=FinetuneConfig(objective="matryoshka", mrl_dims=(2, 512)),
                      progress=False)


@pytest.fixture(scope="module")
def digits():
    from csrv2.data.datasets import load_digits_images

    return load_digits_images(max_train=16, max_test=8)


@pytest.mark.parametrize("objective", ["csrv2", "matryoshka"])
def test_images_train_end_to_end_and_load_back(digits, objective, tmp_path):
    from csrv2.data.backbones import ImageBackbone
    from csrv2.finetune import finetune_images, read_image_model

    backbone = ImageBackbone(image_size=32)
    frozen = backbone.embed(digits.test_images, progress=False)
    trained, head = finetune_images(backbone, digits.train_images, digits.train_labels, k=2, hidden_dim=64,
                                    train=_cfg(epochs=1, batch_size=8), finetune=FinetuneConfig(objective=objective, backbone_lr=1e-3),
                                    out=tmp_path / "img", progress=False)
    x = trained.embed(digits.test_images, progress=False)
    assert not np.allclose(x, frozen, atol=1e-4)  # the backbone learned
    loaded, loaded_head = read_image_model(tmp_path / "img")
    np.testing.assert_allclose(loaded.embed(digits.test_images, progress=False), x, atol=1e-5)
    assert loaded.identity != ImageBackbone(image_size=32).identity  # cached embeddings never mix the two
    if objective == "csrv2":
        assert torch.equal(loaded_head.weight, head.weight)
    else:
        assert head is None and loaded_head is None


@pytest.mark.parametrize("freeze", [True, False])
def test_image_training_keeps_the_pretrained_batchnorm_statistics(digits, freeze, tmp_path):
    from csrv2.data.backbones import ImageBackbone
    from csrv2.finetune import finetune_images

    def statistics(model):  # every BatchNorm's running mean and variance, concatenated
        return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in model.modules()
                          if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)])

    pretrained = statistics(ImageBackbone(image_size=32).model).clone()
    trained, _ = finetune_images(ImageBackbone(image_size=32), digits.train_images, digits.train_labels, k=2, hidden_dim=64,
                                 train=_cfg(epochs=1, batch_size=8), finetune=FinetuneConfig(backbone_lr=1e-3, freeze_batchnorm=freeze),
                                 out=tmp_path / "img", progress=False)
    assert torch.equal(statistics(trained.model), pretrained) == freeze  # the weights trained either way (test above)
    assert read_settings(tmp_path / "img")["finetune"]["detach_target"] is True  # images: the target's gradient is stopped


def test_image_bad_inputs(digits, tmp_path):
    from csrv2.data.backbones import ImageBackbone
    from csrv2.finetune import finetune_images, read_image_model

    with pytest.raises(InputError, match="trains every parameter"):
        finetune_images(ImageBackbone(image_size=32), digits.train_images, digits.train_labels, finetune=FinetuneConfig(lora_rank=4),
                        progress=False)
    with pytest.raises(InputError, match="pass \\(n, H, W\\)"):
        finetune_images(ImageBackbone(image_size=32), digits.train_images[:, :, :, None], digits.train_labels, progress=False)
    with pytest.raises(InputError, match="not an image model folder"):
        read_image_model(tmp_path)


def test_training_can_start_from_a_trained_head(tmp_path):
    backbone = TextBackbone(max_seq_length=16)
    x = backbone.embed(TEXTS, progress=False)
    linear = csrv2.train(x, LABELS, k=2, hidden_dim=64, epochs=3, batch_size=2, device="cpu", progress=False)
    trained, head = finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, train=_cfg(epochs=1, log_every=1),
                                  finetune=FinetuneConfig(backbone_lr=1e-4), out=tmp_path / "warm", progress=False, head=linear)
    assert head.config == linear.config and not torch.equal(head.weight, linear.weight)  # started there, then trained
    log = [json.loads(line) for line in (tmp_path / "warm" / "train_log.jsonl").read_text().splitlines()]
    assert {r["k"] for r in log} == {2}  # the head was annealed already
    with pytest.raises(InputError, match="starting head needs"):
        finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, head=csrv2.SparseHead(csrv2.HeadConfig(8, 16, 2)), progress=False)


def test_the_head_runs_in_float32_under_bf16_autocast():
    """On CUDA the backbone runs under bf16 autocast (FinetuneConfig.bf16); the head must not (it crashed there)."""
    from csrv2.finetune import EndToEnd

    backbone = TextBackbone(max_seq_length=16)
    head = csrv2.SparseHead(csrv2.HeadConfig(384, 256, 2))  # k 2 of 256: the codes are decoded by gathering
    module = EndToEnd(backbone, head, TrainConfig(contrastive="supervised"), FinetuneConfig(), "supervised")
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, fired = module(TEXTS, 2, torch.zeros(256, dtype=torch.bool), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and fired.any()
    assert head.encoder.weight.grad is not None and torch.isfinite(head.encoder.weight.grad).all()


def test_a_checkpoint_written_before_a_config_field_existed_resumes(tmp_path, monkeypatch):
    from csrv2.finetune import Finetuner

    options = dict(k=2, hidden_dim=64, train=_cfg(epochs=1, checkpoint_every=1, log_every=1), finetune=FinetuneConfig(backbone_lr=1e-4),
                   progress=False)
    real_step = Finetuner.train_step

    def crash_at_step_3(self, rows, k):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self, rows, k)

    monkeypatch.setattr(Finetuner, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, out=tmp_path / "run", **options)
    monkeypatch.setattr(Finetuner, "train_step", real_step)
    settings_file = tmp_path / "run" / "checkpoints" / "step-000000002" / "csrv2.json"
    settings = json.loads(settings_file.read_text())
    # as an older csrv2 wrote it: without fields added to the configs since, nor the data's fingerprint
    del settings["train"]["tf32"], settings["finetune"]["bf16"], settings["finetune"]["mrl_dims"], settings["head"]["normalize"]
    del settings["data_fingerprint"]
    settings_file.write_text(json.dumps(settings))
    resumed, resumed_head = finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, out=tmp_path / "run", resume=True, **options)
    whole, whole_head = finetune_text(TextBackbone(max_seq_length=16), TEXTS, LABELS, out=tmp_path / "whole", **options)
    torch.testing.assert_close(whole_head.weight, resumed_head.weight, atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and not (tmp_path / "run" / ".lock").exists()


@pytest.mark.parametrize("fields, message", [
    ({"backbone_lr": float("nan")}, "backbone_lr must be a finite number, got nan"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number, got inf"),
    ({"grad_accum": 2.0}, "grad_accum must be an integer >= 1, got 2.0"),
    ({"lora_rank": True}, "lora_rank must be an integer >= 0, got True"),
    ({"mrl_dims": (2, 4.5)}, "each of mrl_dims must be an integer >= 1, got 4.5"),
    ({"backbone_lr": -1.0}, "backbone_lr must be >= 0, got -1.0"),
    ({"freeze_batchnorm": "no"}, "freeze_batchnorm must be True or False, got 'no'"),
    ({"detach_target": 1}, "detach_target must be True or False, got 1"),
])
def test_finetune_config_refuses_non_finite_and_non_integer_values(fields, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        FinetuneConfig(**fields)
