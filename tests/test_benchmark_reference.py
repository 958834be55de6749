"""benchmarks/train_step.py times csrv2's step against a re-implementation of the official CSRv2 step;
that comparison is only fair while both compute the same objective. Checked here at a tiny size."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from csrv2.config import TrainConfig
from csrv2.objective import step_losses

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_problem(bench, dead_fraction: float, seed: int = 0):
    """d=16, h=64, batch 8 in 3 classes; random biases so that pre_bias and latent_bias matter."""
    head, x, labels, dead = bench.make_problem(16, 64, 2, 8, 8, 3, dead_fraction, seed, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head.pre_bias.copy_(0.1 * torch.randn(16, generator=g))
        head.latent_bias.copy_(0.1 * torch.randn(64, generator=g))
    return head, x, labels, dead


@pytest.mark.parametrize("k", [2, 16])  # the target k and the annealing start min(64, h / 4)
@pytest.mark.parametrize("dead_fraction", [0.3, 0.0])
def test_first_step_losses_and_gradients_match(bench, k, dead_fraction):
    head, x, labels, dead = tiny_problem(bench, dead_fraction)
    ref = copy.deepcopy(head)
    cfg = TrainConfig(contrastive="supervised")
    ours, _ = step_losses(head, x, k, dead, cfg, "supervised", labels)
    stats = torch.zeros(64, dtype=torch.long)
    official, _ = bench.official_losses(ref, x, k, stats, labels, cfg, dead=dead)

    for name in ("loss", "loss_k", "loss_4k", "loss_aux", "loss_cl"):
        assert ours[name].item() == pytest.approx(official[name].item(), rel=1e-4, abs=1e-6), name
    assert (official["loss_aux"].item() > 0) == (dead_fraction > 0)  # AuxK exercised, and 0 with no dead latent

    ours["loss"].backward()
    official["loss"].backward()
    for (name, p), q in zip(head.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_official_dead_stats_count_top_k_calls(bench):
    """Three top-k calls a step: a latent that never fires gains 3; one in the top-4k only is reset."""
    head, x, labels, _ = tiny_problem(bench, 0.0)
    stats = torch.full((64,), 5, dtype=torch.long)
    _, stats = bench.official_losses(head, x, 2, stats, labels, TrainConfig())
    pre = torch.nn.functional.linear(x - head.pre_bias, head.weight, head.latent_bias)
    top = pre.topk(8, dim=1)
    in_4k = torch.zeros(64, dtype=torch.bool)
    in_4k[top.indices[top.values > bench.FIRE_EPS]] = True
    top_k = pre.topk(2, dim=1)
    in_k = torch.zeros(64, dtype=torch.bool)
    in_k[top_k.indices[top_k.values > bench.FIRE_EPS]] = True
    assert (stats[~in_4k] == 8).all()
    assert (stats[in_k] == 1).all()  # reset by the third call
    assert (stats[in_4k & ~in_k] == 2).all()  # reset by the second call
