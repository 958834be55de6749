"""csrv2.losses against values worked out by hand on tiny tensors, and against naive references."""

from __future__ import annotations

import math

import pytest
import torch

from csrv2.losses import (
    auxk_loss,
    cosine_logits,
    pairs_contrastive_from_logits,
    reconstruction_loss,
    self_contrastive_from_logits,
    supervised_contrastive_from_logits,
    total_loss,
)


def supervised_contrastive_loss(codes: torch.Tensor, labels: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """The supervised form on codes (batch, dim): from their cosine matrix, as the objective computes it."""
    return supervised_contrastive_from_logits(cosine_logits(codes, codes, temperature), labels)


def self_contrastive_loss(codes: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    return self_contrastive_from_logits(cosine_logits(codes, codes, temperature))


def pairs_contrastive_loss(queries: torch.Tensor, documents: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    return pairs_contrastive_from_logits(cosine_logits(queries, documents, temperature))


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def approx(value: torch.Tensor, expected: float, rel: float = 1e-6, abs: float = 1e-6) -> bool:
    return value.item() == pytest.approx(expected, rel=rel, abs=abs)


# --- reconstruction --------------------------------------------------------------------------


def test_reconstruction_loss_by_hand():
    x = t([[1, 2], [3, 4]])
    x_hat = t([[0, 2], [5, 1]])
    # differences 1, 0, -2, 3 -> squares 1 + 0 + 4 + 9 = 14 over 4 elements
    assert approx(reconstruction_loss(x, x_hat), 14 / 4)
    assert reconstruction_loss(x, x).item() == 0.0


# --- AuxK --------------------------------------------------------------------------------------


def test_auxk_loss_normalised_mse_by_hand():
    residual = t([[1, 0], [2, 2], [0, 1]])
    residual_hat = t([[0, 0], [2, 1], [0, 0]])
    # MSE: errors (1,0), (0,1), (0,1) -> 3 / 6 = 0.5
    mse = (1 + 0 + 0 + 1 + 0 + 1) / 6
    # normaliser: batch mean of the residual is (1, 1); deviations (0,-1), (1,1), (-1,0) -> 4 / 6
    baseline = (0 + 1 + 1 + 1 + 1 + 0) / 6
    expected = mse / baseline  # 0.75
    assert expected == pytest.approx(0.75)
    assert approx(auxk_loss(residual, residual_hat, torch.tensor(True)), expected)
    assert approx(auxk_loss(residual, residual_hat, True), expected)


def test_auxk_loss_two_samples_by_hand():
    residual = t([[1, 0], [3, 2]])
    residual_hat = t([[0, 0], [2, 2]])
    # MSE (1 + 0 + 1 + 0) / 4 = 0.5; mean (2, 1), deviations (-1,-1), (1,1) -> 4 / 4 = 1
    assert approx(auxk_loss(residual, residual_hat, torch.tensor(True)), 0.5 / 1.0)


@pytest.mark.parametrize("any_dead", [False, torch.tensor(False)])
def test_auxk_loss_is_exactly_zero_without_dead_latents(any_dead):
    residual = t([[1, 0], [2, 2], [0, 1]])
    residual_hat = t([[5, -3], [2, 1], [0, 7]])
    assert auxk_loss(residual, residual_hat, any_dead).item() == 0.0


def test_auxk_loss_constant_residual_gives_zero_not_nan():
    residual = t([[1, 2], [1, 2], [1, 2]])  # no variation over the batch: normaliser 0
    residual_hat = t([[0, 5], [3, 1], [2, 2]]).requires_grad_()
    loss = auxk_loss(residual, residual_hat, torch.tensor(True))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(residual_hat.grad).all()


# --- supervised contrastive --------------------------------------------------------------------


def test_supervised_contrastive_by_hand():
    codes = t([[1, 0], [1, 0], [0, 1]])
    labels = torch.tensor([0, 0, 1])
    # s_ij = cos / 0.2: cos(0,1) = 1 -> 5, cos(., 2) = 0 -> 0, s_ii = 5.
    # i = 0 (and 1): pos = e^5 (own copy) + 2 e^5 (both views of the other 0) = 3 e^5; neg = 2 e^0 = 2
    pos0, neg0 = math.exp(5) + 2 * math.exp(5), 2 * math.exp(0)
    l0 = -math.log(pos0 / (pos0 + neg0))
    # i = 2: pos = e^5 (own copy only); neg = 2 (e^0 + e^0) = 4
    pos2, neg2 = math.exp(5), 2 * (math.exp(0) + math.exp(0))
    l2 = -math.log(pos2 / (pos2 + neg2))
    expected = (l0 + l0 + l2) / 3
    assert approx(supervised_contrastive_loss(codes, labels, 0.2), expected)


def test_supervised_contrastive_non_trivial_cosines_by_hand():
    codes = t([[3, 4], [4, 3], [0, 2]])
    labels = torch.tensor([7, 7, 9])
    T = 0.5
    # cosines: (0,1) = 24/25, (0,2) = 4/5, (1,2) = 3/5; s = cos / 0.5
    s01, s02, s12, s_self = (24 / 25) / T, (4 / 5) / T, (3 / 5) / T, 1 / T
    p0 = math.exp(s_self) + 2 * math.exp(s01)
    n0 = 2 * math.exp(s02)
    p1 = math.exp(s_self) + 2 * math.exp(s01)
    n1 = 2 * math.exp(s12)
    p2 = math.exp(s_self)
    n2 = 2 * (math.exp(s02) + math.exp(s12))
    expected = -(math.log(p0 / (p0 + n0)) + math.log(p1 / (p1 + n1)) + math.log(p2 / (p2 + n2))) / 3
    assert approx(supervised_contrastive_loss(codes, labels, T), expected)


def test_supervised_contrastive_one_class_is_zero():
    codes = t([[1, 0], [0, 1], [1, 1]])
    # every other sample is a positive: no negatives, pos / (pos + 0) = 1
    assert approx(supervised_contrastive_loss(codes, torch.tensor([3, 3, 3])), 0.0)


def naive_two_view_supcon(codes: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """The official recipe's form written out: two identical views, a (2B, 2B) matrix, loops.

    For anchor a of cat(z, z): positives = same label minus a itself, negatives = other labels,
    L_a = -log(sum_pos e^{s_ab} / (sum_pos e^{s_ab} + sum_neg e^{s_ab})), L = mean over 2B anchors.
    """
    z = torch.cat([codes, codes]).double()
    lab = torch.cat([labels, labels]).tolist()
    n = len(lab)
    norms = [math.sqrt(sum(v * v for v in row)) for row in z.tolist()]
    rows = z.tolist()
    total = 0.0
    for a in range(n):
        pos = neg = 0.0
        for b in range(n):
            if b == a:
                continue
            cos = sum(u * v for u, v in zip(rows[a], rows[b], strict=True)) / (norms[a] * norms[b])
            e = math.exp(cos / temperature)
            if lab[b] == lab[a]:
                pos += e
            else:
                neg += e
        total += -math.log(pos / (pos + neg))
    return total / n


@pytest.mark.parametrize("temperature", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supervised_contrastive_equals_naive_two_view(seed, temperature):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(7, 5, generator=g)
    labels = torch.randint(0, 3, (7,), generator=g)
    expected = naive_two_view_supcon(codes, labels, temperature)
    assert supervised_contrastive_loss(codes, labels, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_supervised_contrastive_small_temperature_is_finite():
    # At T = 0.01, e^{1/T} = e^100 overflows float32: the loss must stay finite (log-space).
    g = torch.Generator().manual_seed(3)
    codes = torch.randn(6, 4, generator=g).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = supervised_contrastive_loss(codes, labels, 0.01)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(naive_two_view_supcon(codes.detach(), labels, 0.01), rel=1e-4, abs=1e-4)
    loss.backward()
    assert torch.isfinite(codes.grad).all()


def test_supervised_contrastive_small_temperature_by_hand():
    codes = t([[1, 0], [1, 0], [0, 1]])
    labels = torch.tensor([0, 0, 1])
    # T = 0.01: s = 100 for equal codes, 0 for orthogonal ones; float64 arithmetic handles e^100.
    pos0, neg0 = 3 * math.exp(100), 2.0
    pos2, neg2 = math.exp(100), 4.0
    expected = (2 * -math.log(pos0 / (pos0 + neg0)) - math.log(pos2 / (pos2 + neg2))) / 3
    loss = supervised_contrastive_loss(codes, labels, 0.01)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


# --- self contrastive (CSR v1) -------------------------------------------------------------------


def test_self_contrastive_by_hand():
    codes = t([[1, 0], [1, 0], [0, 1]])
    # every sample its own class; T = 0.2, s = 5 for equal codes, 0 for orthogonal ones
    # i = 0: pos = e^5; neg = 2 (e^5 + e^0)   (i = 1 the same)
    l0 = -math.log(math.exp(5) / (math.exp(5) + 2 * (math.exp(5) + math.exp(0))))
    # i = 2: pos = e^5; neg = 2 (e^0 + e^0)
    l2 = -math.log(math.exp(5) / (math.exp(5) + 2 * (math.exp(0) + math.exp(0))))
    assert approx(self_contrastive_loss(codes, 0.2), (2 * l0 + l2) / 3)


def test_self_contrastive_two_samples_by_hand():
    codes = t([[3, 4], [4, 3]])
    T = 0.5
    # cos = 24/25; s_ii = 2, s_01 = 1.92; L_i = -log(e^2 / (e^2 + 2 e^1.92)) for both i
    li = -math.log(math.exp(2) / (math.exp(2) + 2 * math.exp(1.92)))
    assert approx(self_contrastive_loss(codes, T), li)


def test_self_contrastive_zero_codes_are_finite():
    codes = torch.zeros(3, 4, requires_grad=True)
    loss = self_contrastive_loss(codes, 0.2)
    # zero rows have cosine 0 with everything (themselves included): s = 0,
    # L_i = -log(1 / (1 + 2 (B - 1))) = log(2B - 1) = log 5
    assert torch.isfinite(loss)
    assert approx(loss, math.log(5))
    loss.backward()
    assert torch.isfinite(codes.grad).all()


def test_self_contrastive_some_zero_rows_finite():
    codes = t([[0, 0, 0], [1, 2, 0], [0, 0, 0], [0, 1, 1]]).requires_grad_()
    loss = self_contrastive_loss(codes, 0.2)
    supervised = supervised_contrastive_loss(codes, torch.tensor([0, 0, 1, 1]), 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(supervised)
    assert torch.isfinite(codes.grad).all()


# --- pairs ---------------------------------------------------------------------------------------


def test_pairs_contrastive_by_hand():
    q = t([[1, 0], [0, 1]])
    d = t([[1, 0], [1, 1]])
    r = 1 / math.sqrt(2)
    # s = cos / 0.2: s(q0,d0) = 5, s(q0,d1) = 5r, s(q1,d0) = 0, s(q1,d1) = 5r
    l0 = -math.log(math.exp(5) / (math.exp(5) + math.exp(5 * r)))
    l1 = -math.log(math.exp(5 * r) / (math.exp(0) + math.exp(5 * r)))
    assert approx(pairs_contrastive_loss(q, d, 0.2), (l0 + l1) / 2)


# --- rows of a batch split across processes --------------------------------------------------------


@pytest.mark.parametrize("form", ["supervised", "self", "pairs"])
def test_contrastive_forms_on_row_blocks_average_to_the_whole_batch(form):
    """A process holds rows offset .. offset + n of the (batch, batch) matrix, whose own copies (or documents) are
    columns offset .. offset + n: the mean of the blocks' losses is the whole batch's loss."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    loss = {
        "supervised": lambda rows, offset: supervised_contrastive_from_logits(logits[rows], labels[rows], labels, offset),
        "self": lambda rows, offset: self_contrastive_from_logits(logits[rows], offset),
        "pairs": lambda rows, offset: pairs_contrastive_from_logits(logits[rows], offset),
    }[form]
    whole = loss(slice(0, 6), 0)
    blocks = [loss(slice(start, start + 2), start) for start in (0, 2, 4)]
    torch.testing.assert_close(sum(blocks) / 3, whole)
    assert not torch.allclose(loss(slice(2, 4), 0), blocks[1])  # the offset matters


def test_self_contrastive_is_supervised_with_one_class_per_sample():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(self_contrastive_from_logits(logits), supervised_contrastive_from_logits(logits, torch.arange(5)))


def test_total_loss_weights():
    one, two, three, four = (torch.tensor(v) for v in (1.0, 2.0, 3.0, 4.0))
    # defaults: 1 + 2/8 + 0.1 * 3 + 0.1 * 4 = 1.95
    assert approx(total_loss(one, two, three, four), 1 + 0.25 + 0.3 + 0.4)
    assert approx(total_loss(one, two, three, four, multi_k_coef=0.5, aux_coef=2.0, cl_coef=0.0), 1 + 1 + 6 + 0)
