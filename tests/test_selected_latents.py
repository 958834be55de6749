"""csrv2.kernels: the compiled backward against autograd, alone and inside step_losses."""

from __future__ import annotations

import pytest
import torch

import csrv2.kernels as sl
from csrv2.config import TrainConfig
from csrv2.trainer import step_losses

pytestmark = pytest.mark.skipif(sl.numba is None, reason='the compiled backward needs numba: pip install "csrv2[fast]"')


def reference(x, pre_bias, weight, latent_bias, indices, widths):
    """The same outputs by autograd on dense tensors: z = ReLU(pre at indices), sums per set."""
    z = ((x - pre_bias) @ weight.T + latent_bias).gather(1, indices).relu()
    sums, start = [], 0
    for width in widths:
        sums.append((z[:, start : start + width, None] * weight[indices[:, start : start + width]]).sum(1))
        start += width
    return (z, *sums)


@pytest.mark.parametrize("widths", [(2, 6, 5), (1, 3, 0), (4, 12, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_matches_autograd(widths, dtype):
    g = torch.Generator().manual_seed(sum(widths))
    n, h, d = 7, 32, 5
    params = [torch.randn(n, d, generator=g), 0.1 * torch.randn(d, generator=g), torch.randn(h, d, generator=g),
              0.1 * torch.randn(h, generator=g)]
    params = [p.to(dtype).requires_grad_() for p in params]
    with torch.no_grad():
        pre = (params[0] - params[1]) @ params[2].T + params[3]
    # distinct latents for the first two sets (as the top-k and the rest of the 4k), then a set that may
    # repeat them (AuxK's dead latents can sit in the 4k); random picks include negative pre-activations
    distinct = torch.stack([torch.randperm(h, generator=g)[: widths[0] + widths[1]] for _ in range(n)])
    indices = torch.cat([distinct, torch.randint(h, (n, widths[2]), generator=g)], 1)
    outputs = {"compiled": sl.select(*params, pre, indices, widths), "reference": reference(*params, indices, widths)}
    assert (outputs["reference"][0] == 0).any(), "some selected pre-activations must be negative, to test the ReLU"
    weights = [torch.randn(out.shape, generator=g, dtype=dtype) for out in outputs["reference"]]
    grads = {}
    for name, outs in outputs.items():
        loss = sum((out * w).sum() for out, w in zip(outs, weights))
        grads[name] = torch.autograd.grad(loss, params)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for got, want in zip(outputs["compiled"], outputs["reference"]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for got, want in zip(grads["compiled"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode,k,dead_count", [("supervised", 2, 7), ("self", 3, 0), ("pairs", 1, 30), ("supervised", 8, 12)])
@pytest.mark.parametrize("normalize", [False, True])
def test_step_losses_compiled_equals_autograd_path(make_head, embeddings, monkeypatch, mode, k, dead_count, normalize):
    """Losses, fired latents and the gradients of every parameter and of the input (as when finetuning)."""
    head = make_head(input_dim=8, hidden_dim=32, k=2, k_aux=6, normalize=normalize, seed=5)
    x0 = embeddings(12, 8, seed=6)
    labels = torch.tensor([0, 1, 2] * 4)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[torch.randperm(32, generator=torch.Generator().manual_seed(7))[:dead_count]] = True
    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(sl, "ENABLED", enabled)
        x = x0.clone().requires_grad_()
        losses, fired = step_losses(head, x, k, dead, TrainConfig(), mode, labels if mode == "supervised" else None)
        grads = torch.autograd.grad(losses["loss"], [*head.parameters(), x])
        results[enabled] = ({name: v.detach() for name, v in losses.items()}, fired, grads)
    (compiled, fired_c, grads_c), (plain, fired_p, grads_p) = results[True], results[False]
    assert torch.equal(fired_c, fired_p)
    for name in plain:
        torch.testing.assert_close(compiled[name], plain[name], rtol=1e-5, atol=1e-6)
    if dead_count:
        assert plain["loss_aux"] > 0
    for got, want in zip(grads_c, grads_p):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_compiled_path_only_on_cpu(monkeypatch):
    monkeypatch.setattr(sl, "ENABLED", True)
    assert sl.available("cpu")
    assert not sl.available("cuda")
    assert not sl.available("cpu", torch.bfloat16)
    monkeypatch.setattr(sl, "ENABLED", False)
    assert not sl.available("cpu")


@pytest.mark.parametrize("k,m", [(1, 1), (2, 8), (8, 32), (24, 96), (64, 256), (5, 40)])
def test_top_latents_same_sets_as_topk(k, m):
    """The radix selection (and torch's heap where it serves) picks the values torch.topk picks, top k first."""
    g = torch.Generator().manual_seed(k + m)
    pre = torch.randn(9, 512, generator=g)
    pre[0, :40] = 0.5  # ties across both thresholds
    pre[1] = 0.0
    pre[2, 100] = -0.0
    pre[3] = -torch.arange(512.0)  # all negative
    pre[4, ::3] = torch.finfo(torch.float32).max
    pre[5, 7] = float("inf")
    ids = sl.top_latents(pre, k, m)
    want = pre.topk(m, dim=1).values
    assert ids.shape == (9, m)
    assert all(len(set(row.tolist())) == m for row in ids)
    got = pre.gather(1, ids)
    torch.testing.assert_close(got[:, :k].sort(dim=1, descending=True).values, want[:, :k], rtol=0, atol=0)
    torch.testing.assert_close(got.sort(dim=1, descending=True).values, want, rtol=0, atol=0)


def test_top_latents_among_columns():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(6, 300, generator=g)
    columns = torch.randperm(300, generator=g)[:150].sort().values
    ids = sl.top_latents(pre, 40, 40, columns)
    assert set(ids.unique().tolist()) <= set(columns.tolist())
    want = pre[:, columns].topk(40, dim=1).values
    torch.testing.assert_close(pre.gather(1, ids).sort(dim=1, descending=True).values, want, rtol=0, atol=0)


@pytest.mark.parametrize("k,k_d", [(1, 1), (2, 8), (5, 3)])
def test_sparse_dots_match_zero_filled_products(k, k_d):
    """Dot products of sparse codes, and their gradients, against the product of the zero-filled codes."""
    g = torch.Generator().manual_seed(k * 10 + k_d)
    dim, n, m = 12, 7, 9  # a small space, so that codes share latents
    q_idx = torch.stack([torch.randperm(dim, generator=g)[:k] for _ in range(n)])
    d_idx = torch.stack([torch.randperm(dim, generator=g)[:k_d] for _ in range(m)])
    q_val, d_val = torch.randn(n, k, generator=g, requires_grad=True), torch.randn(m, k_d, generator=g, requires_grad=True)
    weights = torch.randn(n, m, generator=g)
    dense = lambda idx, val: torch.zeros(len(idx), dim).scatter(1, idx, val)
    got = sl.sparse_dots(q_idx, q_val, d_idx, d_val, dim)
    want = dense(q_idx, q_val) @ dense(d_idx, d_val).T
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad((out * weights).sum(), [q_val, d_val]) for out in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_cpu_training_takes_the_compiled_path(make_head, embeddings, monkeypatch):
    """step_losses on CPU goes through SelectedLatents and sparse_dots (and, switched off, through neither)."""
    calls = []
    for name in ("select", "sparse_dots"):
        real = getattr(sl, name)
        monkeypatch.setattr(sl, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    head, x = make_head(input_dim=8, hidden_dim=32, k=2, k_aux=6), embeddings(12, 8)
    step_losses(head, x, 2, torch.zeros(32, dtype=torch.bool), TrainConfig(), "self")
    assert calls == ["select", "sparse_dots"]
    monkeypatch.setattr(sl, "ENABLED", False)
    step_losses(head, x, 2, torch.zeros(32, dtype=torch.bool), TrainConfig(), "self")
    assert calls == ["select", "sparse_dots"]
