"""csrv2.objective: the reference objective against values worked out by hand and a naive dense reference,
the fast path (through autograd and compiled) against the reference in every contrastive mode, and the
pieces of the fast path.

The 4k term is held to the top 4k of the pre-activations as they are, which AuxK's mask of live latents must not change.
"""

from __future__ import annotations

import math

import pytest
import torch

import csrv2.kernels as kernels
import csrv2.objective as objective
from csrv2.config import HeadConfig, TrainConfig
from csrv2.head import SparseHead
from csrv2.losses import cosine_logits, pairs_contrastive_from_logits, self_contrastive_from_logits, supervised_contrastive_from_logits
from csrv2.objective import (
    Objective,
    fast_losses,
    gather_pays,
    matryoshka_loss,
    reference_losses,
    sparse_cosine_logits,
    sparse_to_dense,
    step_losses,
)

needs_numba = pytest.mark.skipif(kernels.numba is None, reason='the compiled path needs numba: pip install "csrv2[fast]"')


@pytest.fixture(params=["reference", "fast", "compiled"])
def path(request, monkeypatch):
    """Runs a test of step_losses once per way it can compute: the reference, the fast path through autograd, compiled."""
    if request.param == "compiled" and kernels.numba is None:
        pytest.skip('the compiled path needs numba: pip install "csrv2[fast]"')
    monkeypatch.setattr(objective, "REFERENCE", request.param == "reference")
    monkeypatch.setattr(kernels, "ENABLED", request.param == "compiled")
    return request.param


def dense_code(pre: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-filled (n, h) code: per row, sort the (allowed) pre-activations, keep the top k, ReLU."""
    n, h = pre.shape
    z = torch.zeros(n, h, dtype=pre.dtype)
    for i in range(n):
        candidates = [j for j in range(h) if allowed is None or bool(allowed[j])]
        ranked = sorted(candidates, key=lambda j: float(pre[i, j]), reverse=True)[:k]
        for j in ranked:
            z[i, j] = max(float(pre[i, j]), 0.0)
    return z


def naive_step(head: SparseHead, x: torch.Tensor, k: int, dead: torch.Tensor) -> dict[str, torch.Tensor]:
    """The CSRv2 reconstruction terms written out densely, in float64."""
    W = head.encoder.weight.detach().double()
    b_pre, b_lat = head.pre_bias.detach().double(), head.latent_bias.detach().double()
    x = x.double()
    if head.config.normalize:
        mu = x.mean(dim=1, keepdim=True)
        std = (x - mu).std(dim=1, keepdim=True)
        x_in = (x - mu) / (std + 1e-5)
    else:
        mu, std, x_in = torch.zeros(len(x), 1, dtype=torch.float64), torch.ones(len(x), 1, dtype=torch.float64), x
    pre = (x_in - b_pre) @ W.T + b_lat  # (n, h)
    h = pre.shape[1]
    z_k, z_4k = dense_code(pre, k), dense_code(pre, min(4 * k, h))
    x_hat_k = (z_k @ W + b_pre) * std + mu
    x_hat_4k = (z_4k @ W + b_pre) * std + mu
    out = {
        "pre": pre,
        "z_k": z_k,
        "z_4k": z_4k,
        "loss_k": ((x - x_hat_k) ** 2).mean(),
        "loss_4k": ((x - x_hat_4k) ** 2).mean(),
    }
    if bool(dead.any()):
        fired = (z_k > 0).any(dim=0)  # a latent that fires in this batch is not dead for its AuxK
        z_aux = dense_code(pre, head.config.k_aux, allowed=dead & ~fired)
        residual = x - x_hat_k
        residual_hat = (z_aux @ W) * std
        mse = ((residual - residual_hat) ** 2).mean()
        baseline = ((residual - residual.mean(dim=0, keepdim=True)) ** 2).mean()
        out["loss_aux"] = mse / baseline
    else:
        out["loss_aux"] = torch.tensor(0.0, dtype=torch.float64)
    return out


def random_setup(make_head, embeddings, normalize=False):
    head = make_head(input_dim=8, hidden_dim=32, k=2, k_aux=4, normalize=normalize, seed=3)
    x = embeddings(6, 8, seed=4)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[0, 5, 6, 11, 17, 20, 29]] = True
    return head, x, dead


@pytest.mark.parametrize("normalize", [False, True])
def test_step_losses_match_naive_reference(make_head, embeddings, normalize, path):
    head, x, dead = random_setup(make_head, embeddings, normalize)
    losses, _ = step_losses(head, x, 2, dead, TrainConfig(), "none")
    ref = naive_step(head, x, 2, dead)
    for name in ("loss_k", "loss_4k", "loss_aux"):
        assert losses[name].item() == pytest.approx(ref[name].item(), rel=1e-5), name
    assert losses["loss_cl"].item() == 0.0
    cfg = TrainConfig()
    expected = ref["loss_k"] + cfg.multi_k_coef * ref["loss_4k"] + cfg.aux_coef * ref["loss_aux"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_step_losses_4k_code_is_not_empty(make_head, embeddings, path):
    head, x, dead = random_setup(make_head, embeddings)
    losses, _ = step_losses(head, x, 2, dead, TrainConfig(), "none")
    ref = naive_step(head, x, 2, dead)
    assert ((ref["z_4k"] > 0).sum(dim=1) == 8).all()  # the example's 4k codes are full: 4k = 8 non-zeros
    empty = ((x - head.pre_bias.detach()) ** 2).mean()  # MSE of an empty code: x_hat = b_pre
    assert losses["loss_4k"].item() != pytest.approx(empty.item(), rel=1e-3)
    assert losses["loss_4k"].item() != pytest.approx(losses["loss_k"].item(), rel=1e-3)
    # the 4k term does not depend on which latents are dead (no in-place masking of the pre-activations)
    alive, _ = step_losses(head, x, 2, torch.zeros(32, dtype=torch.bool), TrainConfig(), "none")
    all_dead, _ = step_losses(head, x, 2, torch.ones(32, dtype=torch.bool), TrainConfig(), "none")
    for other in (alive, all_dead):
        assert torch.equal(other["loss_4k"], losses["loss_4k"]) and torch.equal(other["loss_k"], losses["loss_k"])
    assert alive["loss_aux"].item() == 0.0


def test_step_losses_4k_beats_k_beats_empty_on_orthogonal_head(path):
    # d = 4, h = 16, k = 1: rows 0-3 are an orthonormal basis Q, rows 4-7 are -Q, rows 8-15 random but
    # held off by a latent bias of -10. For r = x - b_pre the positive one of +-q_i . r wins for each i,
    # so the top-4k (= 4) code reconstructs x exactly and the top-k code keeps one coordinate only.
    d, h = 4, 16
    g = torch.Generator().manual_seed(0)
    head = SparseHead(HeadConfig(input_dim=d, hidden_dim=h, k=1, k_aux=2), generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    with torch.no_grad():
        head.encoder.weight[:d] = q.T
        head.encoder.weight[d : 2 * d] = -q.T
        head.latent_bias[2 * d :] = -10.0
        head.pre_bias.copy_(0.3 * torch.randn(d, generator=g))
    x = torch.randn(5, d, generator=g)
    dead = torch.zeros(h, dtype=torch.bool)
    dead[[1, 6, 9, 12]] = True
    losses, _ = step_losses(head, x, 1, dead, TrainConfig(), "none")
    ref = naive_step(head, x, 1, dead)
    empty = ((x - head.pre_bias.detach()) ** 2).mean().item()
    assert losses["loss_4k"].item() == pytest.approx(0.0, abs=1e-10)
    assert losses["loss_4k"].item() == pytest.approx(ref["loss_4k"].item(), abs=1e-10)
    assert losses["loss_k"].item() == pytest.approx(ref["loss_k"].item(), rel=1e-5)
    assert 0.0 < losses["loss_k"].item() < empty
    assert losses["loss_4k"].item() < empty


# k = 1, 2 and 3 at hidden_dim 32: small k may take a k^2 slot-matching path, larger k a zero-filled one.
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["supervised", "self", "pairs"])
def test_step_losses_contrastive_on_the_k_sparse_codes(make_head, embeddings, mode, k, path):
    head, x, dead = random_setup(make_head, embeddings)
    with torch.no_grad():
        head.latent_bias.copy_(-0.2 - 0.1 * head.latent_bias.abs())  # all latent biases negative ...
        x[4] = head.pre_bias  # ... so row 4 (x - b_pre = 0) has pre = b_lat < 0 and an all-zero code
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    cfg = TrainConfig(temperature=0.3)
    losses, _ = step_losses(head, x, k, dead, cfg, mode, labels if mode == "supervised" else None)
    z_k = naive_step(head, x, k, dead)["z_k"].float()
    assert (z_k[4] == 0).all() and (z_k.sum(dim=1) > 0).sum() == 5  # one all-zero code in the batch
    expected = {
        "supervised": lambda: supervised_contrastive_from_logits(cosine_logits(z_k, z_k, 0.3), labels),
        "self": lambda: self_contrastive_from_logits(cosine_logits(z_k, z_k, 0.3)),
        "pairs": lambda: pairs_contrastive_from_logits(cosine_logits(z_k[:3], z_k[3:], 0.3)),  # queries then their documents
    }[mode]()
    assert losses["loss_cl"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_cl"].item() > 0
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_step_losses_float64_head_matches_reference(make_head, embeddings, path):
    """A float64 head (which `encode` supports) must train too, with dead latents present."""
    head, x, dead = random_setup(make_head, embeddings)
    head = head.double()
    losses, _ = step_losses(head, x.double(), 2, dead, TrainConfig(), "self")
    ref = naive_step(head, x, 2, dead)
    for name in ("loss_k", "loss_4k", "loss_aux"):
        assert losses[name].item() == pytest.approx(ref[name].item(), rel=1e-9), name


def test_step_losses_leaves_head_and_input_unchanged(make_head, embeddings, path):
    head, x, dead = random_setup(make_head, embeddings)
    x_before, dead_before = x.clone(), dead.clone()
    params = {name: p.detach().clone() for name, p in head.named_parameters()}
    losses, _ = step_losses(head, x, 2, dead, TrainConfig(), "self")
    for name, p in head.named_parameters():
        assert torch.equal(p.detach(), params[name]), name
        assert p.grad is None
    assert torch.equal(x, x_before) and torch.equal(dead, dead_before)
    losses["loss"].backward()  # and the graph reaches every parameter with finite gradients
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_step_losses_fired_marks_latents_with_positive_topk_values(make_head, embeddings, path):
    head = make_head(input_dim=8, hidden_dim=32, k=2, seed=3)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        head.latent_bias.copy_(-0.1 - 0.5 * torch.rand(32, generator=g))  # all negative
    x = embeddings(6, 8, seed=4)
    x[0] = head.pre_bias.detach()  # row 0: pre = latent_bias < 0, so its top-k values are all 0
    k = 3
    _, fired = step_losses(head, x, k, torch.zeros(32, dtype=torch.bool), TrainConfig(), "none")
    z_k = naive_step(head, x, k, torch.zeros(32, dtype=torch.bool))["z_k"]
    expected = (z_k > 0).any(dim=0)
    assert fired.dtype == torch.bool and fired.shape == (32,)
    assert torch.equal(fired, expected)
    # the example covers the case that matters: a latent in some top-k with value 0 and nowhere else
    row0_topk = head.latent_bias.detach().topk(k).indices
    assert not fired[row0_topk].all()


@pytest.mark.parametrize("hidden_dim", [32, 128])  # k_aux 4 of 32 is zero-filled, of 128 gathered (gather_pays)
@pytest.mark.parametrize("dead_share", ["none", "few", "most"])  # few: the column path when the count is read
def test_auxk_without_reading_the_dead_count_gives_the_same_loss_and_gradients(make_head, embeddings, hidden_dim, dead_share):
    """On a GPU AuxK never reads how many latents are dead (a host synchronisation); it must not matter."""
    head = make_head(input_dim=8, hidden_dim=hidden_dim, k=2, k_aux=4, seed=3)
    x = embeddings(6, 8, seed=4)
    dead_ids = {"none": [], "few": [3, 9], "most": list(range(4, hidden_dim))}[dead_share]
    dead = torch.zeros(hidden_dim, dtype=torch.bool)
    dead[dead_ids] = True
    results = []
    for read_count in (True, False):
        head.zero_grad(set_to_none=True)
        pre = head.preactivations(x)
        x_hat = head.decode(*head.encode(x, 2))
        sums = objective._dead_sums(head, pre, dead, read_count=read_count)  # None: the count was read, none is dead
        loss = torch.zeros(()) if sums is None else objective._auxk(x - x_hat, sums, dead.any())
        (loss + 1e-3 * pre.sum()).backward()  # a second term so that gradients exist with no latent dead
        results.append((loss.detach(), [p.grad.clone() for p in head.parameters()]))
    (loss_read, grads_read), (loss_free, grads_free) = results
    assert torch.allclose(loss_read, loss_free, rtol=1e-6) and (loss_read > 0) == bool(dead_ids)
    if dead_ids:  # and both are the dense reference: the top k_aux dead pre-activations decode the residual
        with torch.no_grad():
            residual = (x - head.decode(*head.encode(x, 2))).double()
            residual_hat = dense_code(head.preactivations(x).double(), 4, allowed=dead) @ head.weight.double()
            ref = ((residual - residual_hat) ** 2).mean() / ((residual - residual.mean(0)) ** 2).mean()
        assert loss_free.item() == pytest.approx(ref.item(), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads_read, grads_free, strict=True))




# --- the reference against values worked out by hand ----------------------------------------------


def hand_example():
    """d = 2, h = 4: W's rows are e1, e2, -e1, -e2, zero biases; k = 1 (so the 4k code has every latent), k_aux = 1.

    pre = W x: rows (2, 1, -2, -1), (-1, 3, 1, -3), (3, -1, -3, 1), (1, 2, -1, -2). The top-1 codes are
    2 e_0, 3 e_1, 3 e_0, 2 e_1 (latents 0 and 1 fire); the 4k codes, ReLU(pre), reconstruct x exactly.
    """
    head = SparseHead(HeadConfig(input_dim=2, hidden_dim=4, k=1, k_aux=1))
    with torch.no_grad():
        head.encoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    x = torch.tensor([[2.0, 1.0], [-1.0, 3.0], [3.0, -1.0], [1.0, 2.0]])
    dead = torch.tensor([False, True, True, True])  # latent 1 fires in the batch, so only 2 and 3 are dead for it
    return head, x, dead


# T = 0.5, codes 2 e_0, 3 e_1, 3 e_0, 2 e_1: s = 2 between codes on one latent (own copy included), 0 across.
HAND_CONTRASTIVE = {
    # labels 0, 1, 0, 1: pos = e^2 (own) + 2 e^2 (the other code on its latent), neg = 2 (e^0 + e^0)
    "supervised": math.log((3 * math.exp(2) + 4) / (3 * math.exp(2))),
    # only the own copy is positive: pos = e^2, neg = 2 (e^2 + e^0 + e^0)
    "self": math.log((3 * math.exp(2) + 4) / math.exp(2)),
    # queries 2 e_0, 3 e_1 against documents 3 e_0, 2 e_1: s = [[2, 0], [0, 2]]
    "pairs": math.log((math.exp(2) + 1) / math.exp(2)),
    "none": 0.0,
}


@pytest.mark.parametrize("mode", list(HAND_CONTRASTIVE))
def test_objective_by_hand(mode, path):
    head, x, dead = hand_example()
    cfg = TrainConfig(temperature=0.5)
    losses, fired = step_losses(head, x, 1, dead, cfg, mode, torch.tensor([0, 1, 0, 1]) if mode == "supervised" else None)
    # x_hat_k = (2, 0), (0, 3), (3, 0), (0, 2): errors (0, 1), (-1, 0), (0, -1), (1, 0) -> 4 / 8
    assert losses["loss_k"].item() == pytest.approx(0.5)
    assert losses["loss_4k"].item() == pytest.approx(0.0, abs=1e-12)
    # AuxK among latents 2 and 3: rows 1 and 2 take pre 1 on latent 2 and 3 (decoding (-1, 0) and (0, -1),
    # exactly their residuals), rows 0 and 3 only negative ones (ReLU: 0). MSE 2 / 8 over the residual's
    # spread about its mean (0, 0), 4 / 8.
    assert losses["loss_aux"].item() == pytest.approx(0.5)
    assert losses["loss_cl"].item() == pytest.approx(HAND_CONTRASTIVE[mode], abs=1e-7)
    assert losses["loss"].item() == pytest.approx(0.5 + 0.125 * 0.0 + 0.1 * 0.5 + 0.1 * HAND_CONTRASTIVE[mode])
    assert fired.tolist() == [True, True, False, False]


def test_objective_by_hand_aux_is_zero_without_dead_latents(path):
    """Latent 1 is marked dead but fires: with nothing else dead, AuxK is 0."""
    head, x, _ = hand_example()
    losses, _ = step_losses(head, x, 1, torch.tensor([False, True, False, False]), TrainConfig(), "none")
    assert losses["loss_aux"].item() == 0.0 and losses["loss"].item() == pytest.approx(0.5)


# --- the fast path against the reference ------------------------------------------------------------


def both_paths(head, x0, k, dead, mode, labels, compiled, detach_target=False):
    """Losses, fired latents and the gradients of every parameter and of x (as when finetuning), by the reference
    and by the fast path; detach_target: reconstruct x.detach() (end to end on images)."""
    results = []
    for losses_of in (reference_losses, lambda *a, **kw: fast_losses(*a, **kw, compiled=compiled)):
        x = x0.clone().requires_grad_()
        target = x.detach() if detach_target else None
        losses, fired = losses_of(head, x, k, dead, TrainConfig(), mode, labels if mode == "supervised" else None, target=target)
        grads = torch.autograd.grad(losses["loss"], [*head.parameters(), x], allow_unused=True)
        results.append(({name: v.detach() for name, v in losses.items()}, fired, grads))
    return results


def assert_same(reference, fast):
    (ref_losses, ref_fired, ref_grads), (fast_losses_, fast_fired, fast_grads) = reference, fast
    assert torch.equal(ref_fired, fast_fired)
    assert ref_losses.keys() == fast_losses_.keys() == {"loss", "loss_k", "loss_4k", "loss_aux", "loss_cl"}
    for name in ref_losses:
        torch.testing.assert_close(fast_losses_[name], ref_losses[name], rtol=1e-5, atol=1e-6, msg=name)
    for got, want in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


COMPILED = [False, pytest.param(True, marks=needs_numba)]


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("mode", ["supervised", "pairs", "self", "none"])
def test_fast_path_equals_reference(make_head, embeddings, mode, k, normalize, compiled):
    head = make_head(input_dim=8, hidden_dim=64, k=2, k_aux=6, normalize=normalize, seed=5)
    x = embeddings(12, 8, seed=6)
    # dead: 7 latents that fire in no top-k code of the batch, and 2 that do (and so are not dead for it)
    fired = torch.zeros(64, dtype=torch.bool)
    fired[head.encode(x, k)[0].unique()] = True
    order = torch.randperm(64, generator=torch.Generator().manual_seed(k))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[order[~fired[order]][:7]] = True
    dead[order[fired[order]][:2]] = True
    reference, fast = both_paths(head, x, k, dead, mode, torch.tensor([0, 1, 2] * 4), compiled)
    assert (dead & ~fired).sum() == 7 and reference[0]["loss_aux"] > 0 and (reference[0]["loss_cl"] > 0) == (mode != "none")
    assert all(g is not None for g in reference[2])  # every parameter and x is reached
    assert_same(reference, fast)


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize("mode", ["supervised", "pairs"])
def test_a_detached_target_keeps_the_losses_and_takes_its_gradient_off_x(make_head, embeddings, mode, compiled):
    head = make_head(input_dim=8, hidden_dim=64, k=2, k_aux=6, seed=5)
    x = embeddings(12, 8, seed=6)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[head.encode(x, 2)[0].unique()] = True  # fired, so not dead for the batch
    dead[torch.randperm(64, generator=torch.Generator().manual_seed(1))[:20]] = True  # AuxK has dead latents to read
    labels = torch.tensor([0, 1, 2] * 4)
    attached = both_paths(head, x, 2, dead, mode, labels, compiled)
    detached = both_paths(head, x, 2, dead, mode, labels, compiled, detach_target=True)
    assert_same(*detached)  # the fast path holds to the reference with a detached target too
    for name, value in attached[0][0].items():  # same values: only the gradient's route changes
        torch.testing.assert_close(detached[0][0][name], value, msg=name)
    for got, want in zip(detached[0][2][:-1], attached[0][2][:-1], strict=True):  # the head learns as before
        torch.testing.assert_close(got, want)
    x_attached, x_detached = attached[0][2][-1], detached[0][2][-1]
    assert not torch.allclose(x_detached, x_attached)  # x no longer gets the target's share
    assert x_detached.abs().sum() > 0  # but still learns through the head's input


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize("dead_count", [0, 32])
@pytest.mark.parametrize("k", [3, 8])  # k = 8: the 4k code has all 32 latents
@pytest.mark.parametrize("mode", ["supervised", "self"])
def test_fast_path_equals_reference_with_none_or_all_dead(make_head, embeddings, mode, k, dead_count, compiled):
    head = make_head(input_dim=8, hidden_dim=32, k=2, k_aux=6, seed=5)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:dead_count] = True
    reference, fast = both_paths(head, embeddings(12, 8, seed=6), k, dead, mode, torch.tensor([0, 1, 2] * 4), compiled)
    assert (reference[0]["loss_aux"] > 0) == bool(dead_count)
    assert_same(reference, fast)


def test_step_losses_chooses_the_path(make_head, embeddings, monkeypatch):
    """The fast path, compiled where kernels.available says; the reference when REFERENCE is set."""
    calls = []
    monkeypatch.setattr(objective, "reference_losses", lambda *a, target: calls.append(("reference", target)))
    monkeypatch.setattr(objective, "fast_losses", lambda *a, target, compiled: calls.append(("fast", compiled, target)))
    head, x, dead = make_head(), embeddings(), torch.zeros(32, dtype=torch.bool)
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        step_losses(head, x, 2, dead, TrainConfig(), "self")
    monkeypatch.setattr(objective, "REFERENCE", True)
    target = x.detach()
    step_losses(head, x, 2, dead, TrainConfig(), "self", target=target)  # the target goes through to the path chosen
    assert calls == [("fast", kernels.numba is not None, None), ("fast", False, None), ("reference", target)]


def test_objective_module_forward_is_step_losses(make_head, embeddings):
    head, x = make_head(), embeddings(6, 8)
    dead, labels = torch.zeros(32, dtype=torch.bool), torch.tensor([0, 1, 0, 1, 2, 2])
    module = Objective(head, TrainConfig(), "supervised")
    assert list(module.parameters()) == list(head.parameters())  # what DDP averages
    got, fired = module(x, 2, dead, labels)
    want, want_fired = step_losses(head, x, 2, dead, TrainConfig(), "supervised", labels)
    assert torch.equal(fired, want_fired) and all(torch.equal(got[name], want[name]) for name in want)


# --- across processes -----------------------------------------------------------------------------------

RANK_PATHS = {"reference": reference_losses, "fast": fast_losses, "compiled": lambda *a: fast_losses(*a, compiled=True)}


def two_rank_problem():
    """A head and a global batch of 12 rows (6 query/document pairs for pairs), labels, dead latents and k."""
    g = torch.Generator().manual_seed(11)
    head = SparseHead(HeadConfig(input_dim=8, hidden_dim=64, k=3, k_aux=6), generator=g)
    with torch.no_grad():
        head.latent_bias.copy_(0.1 * torch.randn(64, generator=g))
    x, labels = torch.randn(12, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2, 2])
    return head, x, labels, torch.arange(64) % 5 == 0, 3


def rank_rows(mode: str, rank: int, world: int) -> torch.Tensor:
    """The rows of the global batch a rank holds (distributed.shard): its pairs' queries then their documents for pairs."""
    if mode == "pairs":
        pairs = torch.arange(6)[rank::world]
        return torch.cat([pairs, pairs + 6])
    return torch.arange(12)[rank::world]


def losses_and_gradients(losses_of, head, x, labels, dead, k, mode):
    x = x.clone().requires_grad_()
    losses, fired = losses_of(head, x, k, dead, TrainConfig(), mode, labels if mode == "supervised" else None)
    return {name: v.detach() for name, v in losses.items()}, fired, torch.autograd.grad(losses["loss"], list(head.parameters()))


def _objective_rank(rank: int, world: int, port: int, out) -> None:
    """One rank of test_two_ranks_compute_the_one_process_objective: writes the mean over ranks of each path's losses
    and gradients (DDP's average), and the fired latents."""
    import os

    from csrv2 import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    try:
        head, x, labels, dead, k = two_rank_problem()
        results = {}
        for name, losses_of in RANK_PATHS.items():
            if name == "compiled" and kernels.numba is None:
                continue
            for mode in ("supervised", "self", "pairs"):
                rows = rank_rows(mode, rank, world)
                losses, fired, grads = losses_and_gradients(losses_of, head, x[rows], labels[rows], dead, k, mode)
                mean = [distributed.sum_over_ranks(t) / world for t in (*losses.values(), *grads)]
                results[name, mode] = (dict(zip(losses, mean[: len(losses)], strict=True)), fired, mean[len(losses) :])
        if rank == 0:
            torch.save(results, out)
    finally:
        distributed.close()


def test_two_ranks_compute_the_one_process_objective(tmp_path):
    """Each path on two ranks of 6 rows: the mean of the ranks' losses and gradients is the one-process result on 12."""
    import torch.multiprocessing as mp

    from test_distributed import _free_port

    mp.spawn(_objective_rank, args=(2, _free_port(), tmp_path / "two.pt"), nprocs=2)
    two = torch.load(tmp_path / "two.pt")
    head, x, labels, dead, k = two_rank_problem()
    assert len(two) == (9 if kernels.numba is not None else 6)
    for (name, mode), (losses, fired, grads) in two.items():
        one_losses, one_fired, one_grads = losses_and_gradients(RANK_PATHS[name], head, x, labels, dead, k, mode)
        assert torch.equal(fired, one_fired), (name, mode)
        assert one_losses["loss_aux"] > 0 and one_losses["loss_cl"] > 0
        for loss in one_losses:
            torch.testing.assert_close(losses[loss], one_losses[loss], rtol=1e-5, atol=1e-6, msg=f"{name} {mode} {loss}")
        for got, want in zip(grads, one_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{name} {mode}")


# --- the fast path's pieces ---------------------------------------------------------------------------


@needs_numba
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
        monkeypatch.setattr(kernels, "ENABLED", enabled)
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
    for got, want in zip(grads_c, grads_p, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@needs_numba
def test_cpu_training_takes_the_compiled_path(make_head, embeddings, monkeypatch):
    """step_losses on CPU goes through SelectedLatents and sparse_dots (and, switched off, through neither)."""
    calls = []
    for name in ("select", "sparse_dots"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    head, x = make_head(input_dim=8, hidden_dim=32, k=2, k_aux=6), embeddings(12, 8)
    step_losses(head, x, 2, torch.zeros(32, dtype=torch.bool), TrainConfig(), "self")
    assert calls == ["select", "sparse_dots"]
    monkeypatch.setattr(kernels, "ENABLED", False)
    step_losses(head, x, 2, torch.zeros(32, dtype=torch.bool), TrainConfig(), "self")
    assert calls == ["select", "sparse_dots"]


def test_gather_pays_by_device():
    # at most dim / 16 non-zeros on CPU, dim / 128 on CUDA; other devices as CPU
    assert gather_pays(4, 64) and not gather_pays(5, 64)
    assert gather_pays(1, 128, "cuda") and not gather_pays(2, 128, "cuda") and not gather_pays(2, 128, "cuda:0")
    assert gather_pays(4, 64, "mps") and not gather_pays(5, 64, "mps")


def test_sparse_to_dense_by_hand():
    indices = torch.tensor([[2, 0], [1, 3]])
    values = torch.tensor([[5.0, 6.0], [7.0, 0.0]]).requires_grad_()
    dense = sparse_to_dense(indices, values, 4)
    assert torch.equal(dense, torch.tensor([[6.0, 0, 5, 0], [0, 7, 0, 0]]))
    (dense * torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])).sum().backward()
    # d/d values = the weight at each value's column
    assert torch.equal(values.grad, torch.tensor([[3.0, 1], [6, 8]]))


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize("k", [2, 5])  # dim 64: k = 2 gathers, k = 5 zero-fills
def test_sparse_cosine_logits_match_dense_reference(k, compiled):
    g = torch.Generator().manual_seed(k)
    dim, n, m = 64, 7, 5
    q_idx = torch.stack([torch.randperm(dim, generator=g)[:k] for _ in range(n)])
    d_idx = torch.stack([torch.randperm(dim, generator=g)[:k] for _ in range(m)])
    d_idx[0] = q_idx[0]  # one pair shares all its latents, so the cosine is not small
    q_val, d_val = torch.rand(n, k, generator=g).requires_grad_(), torch.rand(m, k, generator=g).requires_grad_()
    d_val.data[1] = 0  # an all-zero code gives 0, not NaN
    assert gather_pays(k, dim) == (k == 2)
    weights = torch.randn(n, m, generator=g)
    fast = sparse_cosine_logits(q_idx, q_val, d_idx, d_val, dim, 0.3, compiled)
    (fast * weights).sum().backward()
    fast_grads = q_val.grad.clone(), d_val.grad.clone()
    q_val.grad = d_val.grad = None
    ref = cosine_logits(sparse_to_dense(q_idx, q_val, dim), sparse_to_dense(d_idx, d_val, dim), 0.3)
    (ref * weights).sum().backward()
    assert torch.allclose(fast, ref, atol=1e-6) and (fast[:, 1] == 0).all() and fast[0, 0] > 1
    assert torch.allclose(fast_grads[0], q_val.grad, atol=1e-5) and torch.allclose(fast_grads[1], d_val.grad, atol=1e-5)


# --- the Matryoshka objective ---------------------------------------------------------------------------


def test_matryoshka_loss_is_the_mean_over_prefixes():
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    supervised = lambda codes: supervised_contrastive_from_logits(cosine_logits(codes, codes, 0.2), labels)
    expected = (supervised(z[:, :2]) + supervised(z)) / 2
    torch.testing.assert_close(matryoshka_loss(z, (2, 4), "supervised", labels, 0.2), expected)
    q, d = z.chunk(2)
    pairs = lambda q, d: pairs_contrastive_from_logits(cosine_logits(q, d, 0.2))
    expected = (pairs(q[:, :2], d[:, :2]) + pairs(q, d)) / 2
    torch.testing.assert_close(matryoshka_loss(z, (2, 4), "pairs", None, 0.2), expected)
    self_ = lambda codes: self_contrastive_from_logits(cosine_logits(codes, codes, 0.2))
    expected = (self_(z[:, :2]) + self_(z)) / 2
    torch.testing.assert_close(matryoshka_loss(z, (2, 4), "self", None, 0.2), expected)
