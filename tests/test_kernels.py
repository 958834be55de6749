"""csrv2.kernels against autograd and torch: the compiled selection, decode and backward, and the sparse similarities.

Inside the training step they are held to the reference objective in test_objective.py."""

from __future__ import annotations

import pytest
import torch

import csrv2.kernels as kernels

pytestmark = pytest.mark.skipif(kernels.numba is None, reason='the compiled backward needs numba: pip install "csrv2[fast]"')


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
    outputs = {"compiled": kernels.select(*params, pre, indices, widths), "reference": reference(*params, indices, widths)}
    assert (outputs["reference"][0] == 0).any(), "some selected pre-activations must be negative, to test the ReLU"
    weights = [torch.randn(out.shape, generator=g, dtype=dtype) for out in outputs["reference"]]
    grads = {}
    for name, outs in outputs.items():
        loss = sum((out * w).sum() for out, w in zip(outs, weights, strict=True))
        grads[name] = torch.autograd.grad(loss, params)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for got, want in zip(outputs["compiled"], outputs["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for got, want in zip(grads["compiled"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_compiled_path_only_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "ENABLED", True)
    assert kernels.available("cpu")
    assert not kernels.available("cuda")
    assert not kernels.available("cpu", torch.bfloat16)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert not kernels.available("cpu")


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
    ids = kernels.top_latents(pre, k, m)
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
    ids = kernels.top_latents(pre, 40, 40, columns)
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
    got = kernels.sparse_dots(q_idx, q_val, d_idx, d_val, dim)
    want = dense(q_idx, q_val) @ dense(d_idx, d_val).T
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad((out * weights).sum(), [q_val, d_val]) for out in (got, want)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
