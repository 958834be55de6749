"""MRL baselines: truncation, the principal-direction start, the nested loss, and training on real structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csrv2.config import TrainConfig
from csrv2.data.training import TrainingData
from csrv2.errors import InputError
from csrv2.eval.baselines import (
    MatryoshkaHead,
    load_matryoshka,
    principal_directions,
    save_matryoshka,
    train_matryoshka,
    truncate,
)
from csrv2.objective import matryoshka_loss


def test_truncate_keeps_leading_dims():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(truncate(x, 2), [[0, 1], [4, 5], [8, 9]])
    with pytest.raises(ValueError, match="dim must be in"):
        truncate(x, 5)


def test_principal_directions_order_by_variance():
    rng = np.random.default_rng(0)
    # variances 9, 4, 1 along axes 2, 0, 1 around a mean of (1, 2, 3)
    x = rng.normal(size=(4000, 3)) * np.array([2.0, 1.0, 3.0]) + np.array([1.0, 2.0, 3.0])
    w, b = principal_directions(x, 2)
    assert abs(w[0, 2]) > 0.99 and abs(w[1, 0]) > 0.99
    np.testing.assert_allclose((x @ w.T + b).mean(axis=0), 0, atol=1e-9)  # the bias centres the projections


def _clusters(n=256, d=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 0.5
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_training_lowers_the_loss_and_saves_exactly(tmp_path):
    x, y = _clusters()
    data = TrainingData(x, y)
    cfg = TrainConfig(epochs=15, batch_size=64, lr=3e-3, seed=0, device="cpu")
    start = MatryoshkaHead(16, (2, 4))
    w, b = principal_directions(x.astype(np.float64), 4)
    with torch.no_grad():
        start.linear.weight.copy_(torch.from_numpy(w))
        start.linear.bias.copy_(torch.from_numpy(b))
    head = train_matryoshka(data, cfg, (2, 4), progress=False)

    def loss(h):
        with torch.no_grad():
            return float(matryoshka_loss(h(torch.from_numpy(x)), (2, 4), "supervised", torch.from_numpy(y), 0.2))

    assert loss(head) < loss(start) - 0.05
    assert head.encode(x[:3], 2).shape == (3, 2)
    with pytest.raises(ValueError, match="trained sizes"):
        head.encode(x[:3], 3)
    save_matryoshka(head, tmp_path / "mrl")
    again = load_matryoshka(tmp_path / "mrl")
    np.testing.assert_array_equal(again.encode(x, 4), head.encode(x, 4))
    assert train_matryoshka(data, cfg, (2, 4), progress=False).encode(x, 4).tolist() == head.encode(x, 4).tolist()  # seeded


def test_load_refuses_a_folder_without_a_head(tmp_path):
    with pytest.raises(InputError, match="not a csrv2 Matryoshka head"):
        load_matryoshka(tmp_path)
