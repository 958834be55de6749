"""Settings: defaults resolved once, every cross-field check names its field, presets, devices, frozen configs, field docs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from csrv2.config import DEFAULT_EPOCHS, PRESETS, HeadConfig, TrainConfig, field_docs, preset, resolve_device, resolve_k_init


def test_head_defaults_are_resolved_into_the_config():
    head = HeadConfig(input_dim=8)
    assert (head.hidden_dim, head.k_aux) == (32, 2)  # 4 x 8 latents, 32 / 16 of them for AuxK
    assert HeadConfig(input_dim=384).to_dict()["k_aux"] == 96
    assert HeadConfig(input_dim=2, hidden_dim=8).k_aux == 1  # 8 / 16 rounds to 0, kept at 1
    explicit = HeadConfig(input_dim=8, hidden_dim=20, k=3, k_aux=5)
    assert (explicit.hidden_dim, explicit.k, explicit.k_aux) == (20, 3, 5)
    assert HeadConfig(**head.to_dict()) == head  # a saved config reads back as the same config


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"input_dim": 0}, "input_dim"),
        ({"hidden_dim": -4}, "hidden_dim"),
        ({"k": 33}, "k"),  # above hidden_dim = 32
        ({"k": 0}, "k"),
        ({"k": True}, "k"),  # a bool is not a size
        ({"k": 2.0}, "k"),
        ({"k_aux": 33}, "k_aux"),
        ({"k_aux": -1}, "k_aux"),
        ({"dead_threshold": -1}, "dead_threshold"),
    ],
)
def test_head_config_checks_name_the_field(fields, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        HeadConfig(**{"input_dim": 8, **fields})


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"log_every": 0}, "log_every"),
        ({"checkpoint_every": -1}, "checkpoint_every"),
        ({"decay_ratio": 0.0}, "decay_ratio"),
        ({"decay_ratio": 1.01}, "decay_ratio"),
        ({"decay_ratio": -0.5}, "decay_ratio"),
        ({"k_init": 0}, "k_init"),
        ({"lr": 0.0}, "lr"),
        ({"adam_eps": -1e-8}, "adam_eps"),
        ({"temperature": 0.0}, "temperature"),
        ({"multi_k_coef": -0.1}, "multi_k_coef"),
        ({"aux_coef": -1.0}, "aux_coef"),
        ({"cl_coef": -1e-9}, "cl_coef"),
        ({"contrastive": "triplet"}, "contrastive"),
    ],
)
def test_train_config_checks_name_the_field(fields, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        TrainConfig(**fields)


def test_train_config_accepts_the_edges_of_its_ranges():
    cfg = TrainConfig(decay_ratio=1.0, multi_k_coef=0.0, aux_coef=0.0, cl_coef=0.0, checkpoint_every=0, contrastive="none")
    assert (cfg.decay_ratio, cfg.cl_coef, cfg.contrastive) == (1.0, 0.0, "none")


def test_k_init_below_k_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"k_init \(4\) must be >= k \(8\)"):
        resolve_k_init(4, 8, 1024)
    assert resolve_k_init(8, 8, 1024) == 8  # equal is a run without annealing, not a mistake


def test_presets_and_their_overrides():
    assert PRESETS == ("csrv2", "csr")
    v2, v1 = preset("csrv2"), preset("csr")
    assert (v2.anneal, v2.contrastive) == (True, "auto")
    assert (v1.anneal, v1.contrastive) == (False, "unlabelled")  # pairs with documents, else self; never labels
    # everything else is the shared recipe, so the two differ only where the papers do
    assert {f for f in v2.to_dict() if v2.to_dict()[f] != v1.to_dict()[f]} == {"anneal", "contrastive"}
    assert v2 == TrainConfig()
    tuned = preset("csr", epochs=3, anneal=True)
    assert (tuned.epochs, tuned.anneal, tuned.contrastive) == (3, True, "unlabelled")  # an override wins over the preset
    assert preset("csr", contrastive="self").contrastive == "self"
    with pytest.raises(ValueError, match="^preset must be one of csrv2, csr, got 'csr3'"):
        preset("csr3")
    with pytest.raises(ValueError, match="^epochs must"):
        preset("csrv2", epochs=0)


def test_one_head_only_budget_and_end_to_end_keeps_its_own():
    from csrv2.eval.suite import SuiteConfig
    from csrv2.finetune import FINETUNE_EPOCHS

    assert TrainConfig().epochs == preset("csr").epochs == SuiteConfig().epochs == DEFAULT_EPOCHS == 50
    assert SuiteConfig().finetune_epochs == FINETUNE_EPOCHS == 3


def test_finetune_defaults_to_its_own_epochs_from_python_and_the_command_line(tmp_path, monkeypatch):
    import csrv2.finetune
    from csrv2.cli import build_parser, main
    from csrv2.data.backbones import TextBackbone

    texts = ["rain in the valley", "the striker scored", "rates rose", "a faster chip"]
    finetuner = csrv2.finetune.Finetuner(TextBackbone(max_seq_length=16), texts, k=2, hidden_dim=32, progress=False)
    assert finetuner.cfg.epochs == 3 and finetuner.total_steps == 3  # one batch of 128 an epoch
    seen = []

    class Stop(ValueError):
        pass

    def fake(*args, train, **kwargs):
        seen.append(train.epochs)
        raise Stop("stopped before training")

    monkeypatch.setattr(csrv2.finetune, "Finetuner", fake)
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"{text},{i % 2}\n" for i, text in enumerate(texts)))
    argv = ["finetune", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "ft"), "--no-progress"]
    assert main(argv) == 2 and main([*argv, "--epochs", "5"]) == 2
    assert seen == [3, 5]
    help_ = " ".join(build_parser()._subparsers._group_actions[0].choices["finetune"].format_help().split())
    assert "--epochs defaults to 3, not the 50 of head-only training" in help_ and "(default: 3)" in help_


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    assert resolve_device("auto") == resolve_device(None) == (accelerator or torch.device("cpu"))
    with pytest.raises(ValueError, match="'gpu0' is not a device name.*use auto, cpu"):
        resolve_device("gpu0")
    # a device type this machine lacks: xpu (Intel) on any machine whose accelerator is not one
    if accelerator is None or accelerator.type != "xpu":
        with pytest.raises(ValueError, match="'xpu' is not available on this machine; use auto or cpu"):
            resolve_device("xpu")


def test_configs_are_frozen():
    head, cfg = HeadConfig(input_dim=8), TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        head.k = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 1
    assert head.k == 8 and cfg.epochs == 50


@pytest.mark.parametrize("cls", [HeadConfig, TrainConfig])
def test_field_docs_are_the_docstrings_under_each_field(cls):
    docs = field_docs(cls)
    assert list(docs) == [f.name for f in dataclasses.fields(cls)]  # every field documented, in order
    assert all(doc.strip() and "\n" not in doc for doc in docs.values())  # one line each, for --help


def test_field_docs_read_the_right_string():
    assert field_docs(HeadConfig)["k"] == "Non-zero latents per code: the target k of training and the default k of encoding."
    assert field_docs(TrainConfig)["cl_coef"] == "gamma: weight of the contrastive loss on the k-sparse codes."


def test_the_default_temperature_follows_the_contrastive_form_and_k():
    from csrv2.config import resolve_temperature

    assert [resolve_temperature(None, "pairs", k) for k in (2, 4, 8, 64)] == [0.2, 0.2, 0.05, 0.05]
    assert {resolve_temperature(None, mode, 64) for mode in ("supervised", "self", "none")} == {0.2}
    assert resolve_temperature(None, "pairs", None) == 0.2  # a dense (Matryoshka) head
    assert resolve_temperature(0.3, "pairs", 64) == 0.3  # a given value always wins


def test_a_trainer_records_the_temperature_it_used(tmp_path):
    import numpy as np

    from csrv2.data.training import TrainingData
    from csrv2.trainer import Trainer

    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    for k, documents, want in ((8, x[::-1].copy(), 0.05), (2, x[::-1].copy(), 0.2), (8, None, 0.2)):
        trainer = Trainer(HeadConfig(8, 32, k), TrainConfig(epochs=1, device="cpu"), TrainingData(x, documents=documents), progress=False)
        assert trainer.cfg.temperature == want
