"""Settings: defaults resolved once, every cross-field check names its field, presets, devices, frozen configs, field docs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from csrv2.config import PRESETS, HeadConfig, TrainConfig, field_docs, preset, resolve_device, resolve_k_init


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
    assert (v1.anneal, v1.contrastive) == (False, "self")
    # everything else is the shared recipe, so the two differ only where the papers do
    assert {f for f in v2.to_dict() if v2.to_dict()[f] != v1.to_dict()[f]} == {"anneal", "contrastive"}
    assert v2 == TrainConfig()
    tuned = preset("csr", epochs=3, anneal=True)
    assert (tuned.epochs, tuned.anneal, tuned.contrastive) == (3, True, "self")  # an override wins over the preset
    with pytest.raises(ValueError, match="^preset must be one of csrv2, csr, got 'csr3'"):
        preset("csr3")
    with pytest.raises(ValueError, match="^epochs must"):
        preset("csrv2", epochs=0)


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
    assert head.k == 8 and cfg.epochs == 10


@pytest.mark.parametrize("cls", [HeadConfig, TrainConfig])
def test_field_docs_are_the_docstrings_under_each_field(cls):
    docs = field_docs(cls)
    assert list(docs) == [f.name for f in dataclasses.fields(cls)]  # every field documented, in order
    assert all(doc.strip() and "\n" not in doc for doc in docs.values())  # one line each, for --help


def test_field_docs_read_the_right_string():
    assert field_docs(HeadConfig)["k"] == "Non-zero latents per code: the target k of training and the default k of encoding."
    assert field_docs(TrainConfig)["cl_coef"] == "gamma: weight of the contrastive loss on the k-sparse codes."
