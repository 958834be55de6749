"""The trainer: determinism, resume = uninterrupted, annealing and presets as logged, run-folder rules."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import csrv2.objective as objective
from csrv2 import InputError, TrainingData, load, train
from csrv2.config import HeadConfig, TrainConfig, preset
from csrv2.trainer import Trainer, contrastive_mode, tf32_matmuls, update_dead_counters


def clustered(n=192, d=16, classes=4, seed=0):
    """(n, d) unit vectors around `classes` centres, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    labels = rng.integers(0, classes, n)
    x = centres[labels] + 0.4 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def log_lines(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


SMALL = dict(k=2, hidden_dim=64, epochs=3, batch_size=32, log_every=1, progress=False)


def test_same_seed_same_weights(tmp_path):
    x, y = clustered()
    a = train(x, y, **SMALL)
    b = train(x, y, **SMALL)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    x, y = clustered()
    full = train(x, y, out=tmp_path / "full", checkpoint_every=4, **SMALL)

    original = Trainer.train_step

    def interrupted(self, *args):
        if self.step == 11:  # the last checkpoint was written after step 8
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(x, y, out=tmp_path / "cut", checkpoint_every=4, **SMALL)
    assert (tmp_path / "cut" / "checkpoints" / "step-000000008").is_dir()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    monkeypatch.setattr(Trainer, "train_step", original)

    resumed = train(x, y, out=tmp_path / "cut", checkpoint_every=4, resume=True, **SMALL)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    # The log holds each step once, with the same values as the uninterrupted run's.
    full_log, cut_log = log_lines(tmp_path / "full"), log_lines(tmp_path / "cut")
    assert [r["step"] for r in cut_log] == list(range(1, 19))
    assert [r["loss"] for r in cut_log] == pytest.approx([r["loss"] for r in full_log], abs=1e-6)
    assert not (tmp_path / "cut" / "checkpoints").exists()
    assert torch.equal(load(tmp_path / "cut").weight, full.weight)


def test_annealing_and_presets_as_logged(tmp_path):
    x, y = clustered(n=256)
    train(x, y, out=tmp_path / "v2", **{**SMALL, "epochs": 10})
    ks = [r["k"] for r in log_lines(tmp_path / "v2")]
    assert ks[0] == 16  # k_init 64 capped at hidden_dim / 4
    assert ks[-1] == 2 and ks == sorted(ks, reverse=True)
    # 80 steps, k reached after 0.7 * 80 = 56; halfway there (step 28) k = (16 + 2) / 2.
    assert len(ks) == 80 and ks[28] == 9 and set(ks[56:]) == {2} and ks[55] == 2 and ks[50] == 3
    settings = json.loads((tmp_path / "v2" / "csrv2.json").read_text())
    assert settings["contrastive"] == "supervised" and settings["k_init"] == 16

    train(x, out=tmp_path / "v1", preset_name="csr", **SMALL)
    assert {r["k"] for r in log_lines(tmp_path / "v1")} == {2}
    assert json.loads((tmp_path / "v1" / "csrv2.json").read_text())["contrastive"] == "self"


def test_csr_trains_the_pairs_loss_on_pairs_and_never_reads_labels(tmp_path):
    x, y = clustered()
    docs = x + 0.05 * np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    train(x, documents=docs, preset_name="csr", out=tmp_path / "pairs", **SMALL)
    assert json.loads((tmp_path / "pairs" / "csrv2.json").read_text())["contrastive"] == "pairs"
    assert {r["k"] for r in log_lines(tmp_path / "pairs")} == {2}  # fixed k, no annealing
    csr = preset("csr")
    assert contrastive_mode(csr, TrainingData(x, y)) == contrastive_mode(csr, TrainingData(x)) == "self"  # labels unused
    assert contrastive_mode(preset("csr", contrastive="supervised"), TrainingData(x, y)) == "supervised"  # an override still wins
    assert contrastive_mode(preset("csr", contrastive="self"), TrainingData(x)) == "self"
    with pytest.raises(InputError, match="does not use documents"):
        contrastive_mode(preset("csr", contrastive="self"), TrainingData(x, documents=docs))


def test_pairs_training_uses_the_pairs_loss(tmp_path):
    from csrv2.head import SparseHead
    from csrv2.losses import cosine_logits, pairs_contrastive_from_logits
    from csrv2.objective import sparse_to_dense
    from csrv2.trainer import epoch_order

    x, _ = clustered()
    docs = x + 0.05 * np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    head = train(x, documents=docs, out=tmp_path / "pairs", **SMALL)
    assert json.loads((tmp_path / "pairs" / "csrv2.json").read_text())["contrastive"] == "pairs"
    assert head.config.k == 2
    # Step 1's logged loss_cl, recomputed: the seed's initial head, the first batch of epoch 0, k_init = 64 // 4,
    # and the pairs loss of each query's k-sparse code against its own document's (the others in the batch are negatives).
    start = SparseHead(HeadConfig(16, 64, 2), torch.Generator().manual_seed(0))
    rows = np.sort(epoch_order(0, 0, len(x))[:32])

    def codes(a: np.ndarray) -> torch.Tensor:  # (n, 16) -> (n, 64) zero-filled codes at k = 16
        return sparse_to_dense(*start.encode(torch.from_numpy(a), 16), 64)

    expected = float(pairs_contrastive_from_logits(cosine_logits(codes(x[rows]), codes(docs[rows]), 0.2)))
    first = log_lines(tmp_path / "pairs")[0]
    assert (first["step"], first["k"]) == (1, 16)
    assert first["loss_cl"] == pytest.approx(expected, rel=1e-5)
    assert expected < np.log(32)  # documents are near-copies of their queries: far below chance over 32 candidates


def test_dead_latents_are_counted_and_revived_by_auxk(tmp_path):
    # Many latents and k = 1 leave most latents unused: they must be counted dead and AuxK must act.
    x, y = clustered(n=256)
    train(x, y, out=tmp_path / "run", k=1, hidden_dim=256, epochs=6, batch_size=32, log_every=1, progress=False,
          anneal=False, dead_threshold=5)
    log = log_lines(tmp_path / "run")
    assert log[0]["dead_pct"] == 0 and log[0]["loss_aux"] == 0  # nothing can be dead before 5 steps
    assert max(r["dead_pct"] for r in log) > 10
    assert max(r["loss_aux"] for r in log) > 0


def test_losses_fall(tmp_path):
    x, y = clustered(n=512)
    train(x, y, out=tmp_path / "run", k=4, hidden_dim=64, epochs=8, batch_size=64, progress=False, anneal=False, lr=3e-3)
    log = log_lines(tmp_path / "run")
    assert log[-1]["loss_k"] < 0.5 * log[0]["loss_k"]


def test_run_folder_rules(tmp_path):
    x, y = clustered(n=64)
    out = tmp_path / "run"
    train(x, y, out=out, **SMALL)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(InputError, match="already holds a training run"):
        train(x, y, out=out, **SMALL)
    with pytest.raises(InputError, match="no checkpoint to resume"):
        train(x, y, out=out, resume=True, **SMALL)
    assert (out / "model.safetensors").read_bytes() == before  # refused runs leave the model as it was
    train(x, y, out=out, overwrite=True, **{**SMALL, "seed": 1})
    assert (out / "model.safetensors").read_bytes() != before


def test_resume_with_other_options_is_refused(tmp_path, monkeypatch):
    x, y = clustered()
    original = Trainer.train_step

    def interrupted(self, *args):
        if self.step == 7:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(x, y, out=tmp_path / "run", checkpoint_every=3, **SMALL)
    monkeypatch.setattr(Trainer, "train_step", original)
    with pytest.raises(InputError, match="lr"):
        train(x, y, out=tmp_path / "run", checkpoint_every=3, resume=True, lr=1e-3, **SMALL)
    with pytest.raises(InputError, match="samples"):
        train(x[:100], y[:100], out=tmp_path / "run", checkpoint_every=3, resume=True, **SMALL)


def test_bad_training_input_is_refused_before_work():
    x, y = clustered(n=64)
    with pytest.raises(InputError, match="labels have shape"):
        TrainingData(x, y[:10])
    bad = x.copy()
    bad[5, 3] = np.nan
    with pytest.raises(InputError, match="row 5 has NaN"):
        TrainingData(bad)
    bad[5, 3] = np.inf
    with pytest.raises(InputError, match="row 5 has NaN or Inf"):
        TrainingData(bad)
    with pytest.raises(InputError, match="empty"):
        TrainingData(np.zeros((0, 16), np.float32))
    with pytest.raises(ValueError, match="k_init \\(1\\) must be >= k \\(2\\)"):
        train(x, y, k_init=1, **{**SMALL})
    with pytest.raises(ValueError, match="k must be an integer in \\[1, hidden_dim=64\\]"):
        train(x, y, **{**SMALL, "k": 0})
    with pytest.raises(ValueError, match="k must be an integer in \\[1, hidden_dim=64\\]"):
        train(x, y, **{**SMALL, "k": 65})
    with pytest.raises(InputError, match="needs labels"):
        Trainer(HeadConfig(16, 64, 2), preset("csrv2", contrastive="supervised"), TrainingData(x))
    with pytest.raises(InputError, match="input_dim"):
        Trainer(HeadConfig(8, 64, 2), preset("csrv2"), TrainingData(x))


# --- the step's bookkeeping ---------------------------------------------------------------------


def test_tf32_matmuls_sets_the_switch_inside_and_restores_it():
    before = torch.backends.cuda.matmul.allow_tf32
    for enabled in (True, False):
        with tf32_matmuls(enabled):
            assert torch.backends.cuda.matmul.allow_tf32 is enabled
        assert torch.backends.cuda.matmul.allow_tf32 is before


# --- dead-latent counters ----------------------------------------------------------------------


def test_update_dead_counters_resets_fired_and_counts_the_rest():
    counters = torch.tensor([0, 3, 30, 31, 7])
    fired = torch.tensor([True, False, False, True, False])
    new = update_dead_counters(counters, fired)
    assert new.tolist() == [0, 4, 31, 0, 8]
    assert counters.tolist() == [0, 3, 30, 31, 7]  # a new tensor, input untouched


def test_dead_after_more_than_dead_threshold_steps_without_firing():
    threshold = HeadConfig(input_dim=4).dead_threshold
    assert threshold == 30
    counters = torch.zeros(3, dtype=torch.long)
    never, always = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    for _ in range(30):
        counters = update_dead_counters(counters, never)
    assert counters.tolist() == [30, 30, 30]
    assert not (counters > threshold).any()  # 30 steps without firing: not yet dead
    counters = update_dead_counters(counters, never)
    assert (counters > threshold).all()  # 31 steps: dead
    counters = update_dead_counters(counters, torch.tensor([True, False, False]))
    assert (counters > threshold).tolist() == [False, True, True]
    assert update_dead_counters(counters, always).tolist() == [0, 0, 0]


def test_trainer_dead_mask_boundary(monkeypatch):
    """The trainer passes dead = counters > dead_threshold to the objective: 30 is alive, 31 is dead."""
    head_config = HeadConfig(input_dim=4, hidden_dim=8, k=1, dead_threshold=30)
    data = TrainingData(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    trainer = Trainer(head_config, TrainConfig(epochs=1, batch_size=4, device="cpu", contrastive="none"), data, progress=False)
    trainer.counters = torch.tensor([0, 29, 30, 31, 32, 100, 30, 31])
    assert trainer.dead_fraction() == pytest.approx(4 / 8)

    seen = {}
    real = objective.step_losses

    def spy(head, x, k, dead, cfg, mode, labels=None):
        seen["dead"] = dead.clone()
        return real(head, x, k, dead, cfg, mode, labels)

    monkeypatch.setattr(objective, "step_losses", spy)  # what the trainer's Objective module calls
    x = torch.from_numpy(data.embeddings[:4])
    trainer.train_step(x, None, 1)
    assert seen["dead"].tolist() == [False, False, False, True, True, True, False, True]


@pytest.mark.parametrize("fields, message", [
    ({"lr": float("inf")}, "lr must be a finite number, got inf"),
    ({"cl_coef": float("nan")}, "cl_coef must be a finite number, got nan"),
    ({"adam_eps": float("nan")}, "adam_eps must be a finite number, got nan"),
    ({"decay_ratio": float("-inf")}, "decay_ratio must be a finite number, got -inf"),
    ({"epochs": 2.0}, "epochs must be an integer >= 1, got 2.0"),
    ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"lr": "1e-3"}, "lr must be a finite number, got '1e-3'"),
])
def test_train_config_refuses_non_finite_and_non_integer_values(fields, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TrainConfig(**fields)


def test_head_config_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="input_dim must be an integer >= 1, got 8.0"):
        HeadConfig(8.0)
    with pytest.raises(ValueError, match="normalize must be True or False"):
        HeadConfig(8, normalize="yes")
    with pytest.raises(ValueError, match="hidden_dim x input_dim = 1048576 x 4096 weights, above the 2.*hidden_dim of at most 524288"):
        HeadConfig(4096, 2**20)
    assert HeadConfig(4096, 2**19).hidden_dim == 2**19  # the largest allowed


def test_training_data_refuses_overflow_nan_labels_and_missing_shards(tmp_path):
    x, y = clustered(n=64)
    big = x.astype(np.float64)
    big[7, 2] = 1e300  # finite in float64, Inf in the float32 that training computes in
    with pytest.raises(InputError, match="embeddings row 7 has values beyond float32's range"):
        TrainingData(big)
    TrainingData(x.astype(np.float64))  # float64 within range is fine
    labels = y.astype(np.float64)
    labels[[3, 9]] = np.nan
    with pytest.raises(InputError, match="label row 3 is NaN \\(2 of 64 rows\\)"):
        train(x, labels, **SMALL)
    with pytest.raises(InputError, match="label row 3 is NaN"):
        TrainingData(x, labels)
    from csrv2.data.training import load_training_data

    for number in (0, 1, 5):
        np.save(tmp_path / f"embeddings-{number:05d}.npy", x[:4])
    with pytest.raises(InputError, match="embeddings-00002.npy is missing \\(3 shards numbered up to 5\\)"):
        load_training_data(tmp_path)
    for number in (2, 3, 4):
        np.save(tmp_path / f"embeddings-{number:05d}.npy", x[:4])
    assert len(load_training_data(tmp_path)) == 24
    np.save(tmp_path / "embeddings-old.npy", x[:4])
    with pytest.raises(InputError, match="embeddings-old.npy is not a numbered shard"):
        load_training_data(tmp_path)
