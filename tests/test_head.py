"""csrv2.head.SparseHead: layout, initialisation, encode/decode against naive dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csrv2.config import HeadConfig
from csrv2.errors import InputError
from csrv2.head import SparseHead, encode, parameter_shapes, project
from csrv2.search.index import InvertedIndex


def naive_pre(head: SparseHead, x: torch.Tensor) -> torch.Tensor:
    """pre = (x - b_pre) @ W.T + b_lat, densely, in float64. x: (n, d) -> (n, h)."""
    W = head.encoder.weight.detach().double()
    return (x.double() - head.pre_bias.detach().double()) @ W.T + head.latent_bias.detach().double()


def naive_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row descending, keep the first k, ReLU the values."""
    values, indices = pre.sort(dim=1, descending=True)
    return indices[:, :k], values[:, :k].clamp_min(0)


def naive_decode(head: SparseHead, indices: torch.Tensor, values: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """Zero-filled z (n, h), then x_hat = z @ W (= W^T z per row) + b_pre, in float64."""
    n, h = indices.shape[0], head.config.hidden_dim
    z = torch.zeros(n, h, dtype=torch.float64)
    for i in range(n):
        for j, v in zip(indices[i].tolist(), values[i].tolist()):
            z[i, j] = v
    out = z @ head.encoder.weight.detach().double()
    return out + head.pre_bias.detach().double() if bias else out


# --- layout and initialisation -------------------------------------------------------------------


def test_parameter_names_and_shapes_match_sentence_transformers(make_head):
    head = make_head(input_dim=8, hidden_dim=32)
    shapes = {name: tuple(p.shape) for name, p in head.named_parameters()}
    # sentence-transformers' SparseAutoEncoder: pre_bias (d,), encoder.weight (h, d), latent_bias (h,)
    assert shapes == {"pre_bias": (8,), "encoder.weight": (32, 8), "latent_bias": (32,)}
    assert head.encoder.bias is None
    assert list(head.buffers()) == []  # no training state (counters) in the head


def test_init_unit_norm_rows_zero_biases():
    head = SparseHead(HeadConfig(input_dim=6, hidden_dim=24, k=2), generator=torch.Generator().manual_seed(0))
    norms = head.encoder.weight.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones(24), atol=1e-6)
    assert torch.equal(head.pre_bias.detach(), torch.zeros(6))
    assert torch.equal(head.latent_bias.detach(), torch.zeros(24))
    assert torch.equal(head.weight, head.encoder.weight)


def test_init_is_seeded():
    a = SparseHead(HeadConfig(input_dim=4, k=1), generator=torch.Generator().manual_seed(5))
    b = SparseHead(HeadConfig(input_dim=4, k=1), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.encoder.weight, b.encoder.weight)


# --- encode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 31, 32])
def test_encode_matches_naive_reference(make_head, embeddings, k):
    head = make_head(input_dim=8, hidden_dim=32, k=2)
    x = embeddings(6, 8)
    indices, values = head.encode(x, k)
    assert indices.shape == values.shape == (6, k)
    assert indices.dtype == torch.int64 and values.dtype == torch.float32
    ref_idx, ref_val = naive_topk(naive_pre(head, x), k)
    assert torch.equal(indices, ref_idx)
    assert torch.allclose(values.double(), ref_val, atol=1e-5)
    assert (values >= 0).all()


def test_encode_default_k_is_config_k(make_head, embeddings):
    head = make_head(k=3)
    indices, _ = head.encode(embeddings(4, 8))
    assert indices.shape == (4, 3)


def test_encode_relu_zeroes_negative_topk(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32)
    with torch.no_grad():
        head.latent_bias.fill_(-100.0)  # every pre-activation negative
    _, values = head.encode(embeddings(3, 8), 4)
    assert torch.equal(values, torch.zeros(3, 4))


def test_encode_mutates_nothing(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32, k=2)
    x = embeddings(5, 8)
    x_before = x.clone()
    params_before = {name: p.detach().clone() for name, p in head.named_parameters()}
    config_before = head.config
    for k in (1, 2, 7, 32):  # any k <= hidden_dim at inference, not only the config's k
        head.encode(x, k)
    assert torch.equal(x, x_before)
    for name, p in head.named_parameters():
        assert torch.equal(p.detach(), params_before[name]), name
        assert p.grad is None
    assert head.config == config_before and head.config.k == 2
    assert list(head.buffers()) == []


@pytest.mark.parametrize("k", [0, 33, -1])
def test_encode_k_out_of_range_raises(make_head, embeddings, k):
    head = make_head(input_dim=8, hidden_dim=32)
    with pytest.raises(ValueError, match="k"):
        head.encode(embeddings(2, 8), k)


@pytest.mark.parametrize("shape", [(3, 7), (3, 9), (8,), (2, 3, 8)])
def test_encode_wrong_input_dim_raises(make_head, shape):
    head = make_head(input_dim=8, hidden_dim=32)
    with pytest.raises(ValueError, match="8"):
        head.encode(torch.randn(*shape), 2)


# --- decode ---------------------------------------------------------------------------------------


def test_decode_matches_naive_dense(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32)
    indices, values = head.encode(embeddings(5, 8), 6)
    out = head.decode(indices, values)
    assert out.shape == (5, 8)
    assert torch.allclose(out.double(), naive_decode(head, indices, values), atol=1e-5)


def test_decode_hand_picked_codes(make_head):
    head = make_head(input_dim=8, hidden_dim=32)
    indices = torch.tensor([[3, 0], [31, 31 - 1]])
    values = torch.tensor([[2.0, -1.0], [0.0, 0.5]])
    W, b = head.encoder.weight.detach(), head.pre_bias.detach()
    expected = torch.stack([2 * W[3] - W[0] + b, 0.5 * W[30] + b])
    assert torch.allclose(head.decode(indices, values), expected, atol=1e-6)


def test_decode_without_bias_drops_pre_bias(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32)
    indices, values = head.encode(embeddings(4, 8), 3)
    with_bias = head.decode(indices, values)
    without = head.decode(indices, values, bias=False)
    assert torch.allclose(without.double(), naive_decode(head, indices, values, bias=False), atol=1e-5)
    assert torch.allclose(with_bias - without, head.pre_bias.detach().expand(4, 8), atol=1e-6)


def test_decode_gradients_reach_values_and_weight(make_head):
    head = make_head(input_dim=4, hidden_dim=8)
    indices = torch.tensor([[1, 5]])
    values = torch.tensor([[2.0, 3.0]], requires_grad=True)
    head.decode(indices, values).sum().backward()
    W = head.encoder.weight.detach()
    assert torch.allclose(values.grad, torch.stack([W[1].sum(), W[5].sum()])[None])
    grad = head.encoder.weight.grad
    assert torch.allclose(grad[1], torch.full((4,), 2.0)) and torch.allclose(grad[5], torch.full((4,), 3.0))
    assert grad[[0, 2, 3, 4, 6, 7]].abs().sum() == 0


# --- normalize (sentence-transformers' LN) ---------------------------------------------------------


def st_layer_norm(x: torch.Tensor, eps: float = 1e-5):
    """sentence-transformers SparseAutoEncoder.LN: mu, x - mu, std of that (unbiased), divide by std + eps."""
    mu = x.mean(dim=-1, keepdim=True)
    centred = x - mu
    std = centred.std(dim=-1, keepdim=True)
    return centred / (std + eps), mu, std


def test_standardize_matches_sentence_transformers(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32, normalize=True)
    x = 3 * embeddings(4, 8) + 1
    got, mu, std = head.standardize(x)
    ref, ref_mu, ref_std = st_layer_norm(x)
    assert torch.allclose(got, ref) and torch.allclose(mu, ref_mu) and torch.allclose(std, ref_std)


def test_standardize_is_identity_without_normalize(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32)
    x = embeddings(4, 8)
    got, mu, std = head.standardize(x)
    assert got is x and mu is None and std is None


def test_encode_with_normalize_uses_standardised_input(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32, normalize=True)
    x = 5 * embeddings(4, 8) - 2
    x_std, _, _ = st_layer_norm(x)
    indices, values = head.encode(x, 4)
    ref_idx, ref_val = naive_topk(naive_pre(head, x_std), 4)
    assert torch.equal(indices, ref_idx)
    assert torch.allclose(values.double(), ref_val, atol=1e-5)


def test_normalize_round_trip(embeddings):
    # W = [I; -I] (h = 2d), zero biases: with k = h, z = (relu(x'), relu(-x')) and W^T z = x' exactly,
    # so decode(encode(x)) * std + mu = (x - mu) * std / (std + 1e-5) + mu.
    d = 4
    head = SparseHead(HeadConfig(input_dim=d, hidden_dim=2 * d, k=2, normalize=True))
    with torch.no_grad():
        head.encoder.weight.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
    x = 2 * embeddings(3, d) + 0.5
    x_std, mu, std = st_layer_norm(x)
    indices, values = head.encode(x, 2 * d)
    out = head.decode(indices, values, std=std, mu=mu)
    assert torch.allclose(out, x_std * std + mu, atol=1e-6)
    assert torch.allclose(out, (x - mu) * std / (std + 1e-5) + mu, atol=1e-6)
    assert torch.allclose(out, x, atol=1e-4)
    # the pre_bias is added before un-standardising: (W^T z + b_pre) * std + mu
    with torch.no_grad():
        head.pre_bias.fill_(0.25)
    b = head.pre_bias.detach()
    z_idx, z_val = head.encode(x, 2 * d)
    ref = (naive_decode(head, z_idx, z_val).float()) * std + mu
    assert torch.allclose(head.decode(z_idx, z_val, std=std, mu=mu), ref, atol=1e-5)
    assert torch.allclose(ref, ((x_std - b).relu() - (b - x_std).relu() + b) * std + mu, atol=1e-5)


# two sets, of widths `width` and 3: both gathered, one zero-filled and one gathered, both zero-filled, and by default
@pytest.mark.parametrize("hidden_dim, width, gathered", [(512, 4, [True, True]), (512, 64, [False, True]), (64, 8, [False, True]),
                                                         (32, 8, [False, False]), (32, 8, None)])
def test_gather_decode_gradients_match_dense_reference(hidden_dim, width, gathered):
    """decode_sums (gathered, zero-filled and mixed sets) against autograd through a zero-filled product."""
    g = torch.Generator().manual_seed(0)
    head = SparseHead(HeadConfig(input_dim=12, hidden_dim=hidden_dim, k=2), generator=g).double()
    idx_a = torch.rand(5, hidden_dim, generator=g).topk(width, dim=1).indices
    idx_b = torch.rand(5, hidden_dim, generator=g).topk(3, dim=1).indices
    val_a = torch.rand(5, width, generator=g, dtype=torch.float64, requires_grad=True)
    val_b = torch.rand(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    out_a, out_b = head.decode_sums([(idx_a, val_a), (idx_b, val_b)], gathered)
    target = torch.randn(5, 12, generator=g, dtype=torch.float64)
    ((out_a - target) ** 2 + out_b * target).sum().backward()
    fast = (head.encoder.weight.grad.clone(), val_a.grad.clone(), val_b.grad.clone())

    head.encoder.weight.grad, val_a.grad, val_b.grad = None, None, None
    W = head.encoder.weight
    dense = lambda idx, val: torch.zeros(5, hidden_dim, dtype=torch.float64).scatter(1, idx, val) @ W  # noqa: E731
    ref_a, ref_b = dense(idx_a, val_a), dense(idx_b, val_b)
    torch.testing.assert_close(out_a, ref_a)
    torch.testing.assert_close(out_b, ref_b)
    ((ref_a - target) ** 2 + ref_b * target).sum().backward()
    for got, want in zip(fast, (W.grad, val_a.grad, val_b.grad), strict=True):
        torch.testing.assert_close(got, want)


def test_decode_sums_wants_one_gathered_flag_per_set():
    head = SparseHead(HeadConfig(input_dim=4, hidden_dim=16, k=2))
    codes = [(torch.tensor([[0, 1]]), torch.ones(1, 2))] * 2
    with pytest.raises(ValueError, match="2 code sets but 1 gathered flags"):
        head.decode_sums(codes, [True])


def test_digest_names_the_weights_and_the_input_standardisation(make_head):
    head = make_head()
    assert head.digest() == make_head().digest()
    assert head.digest() != make_head(seed=1).digest()  # same shape, other weights
    other = make_head(normalize=True)
    other.load_state_dict(head.state_dict())
    assert other.digest() != head.digest()  # same weights, other codes


def test_parameter_shapes_are_the_heads(make_head):
    head = make_head(input_dim=8, hidden_dim=32)
    assert parameter_shapes(head.config) == {name: tuple(p.shape) for name, p in head.named_parameters()}


@pytest.mark.parametrize("normalize", [False, True])
def test_project_is_the_centred_query_against_decoded_codes(make_head, normalize):
    """u = W (x' - b_pre), so u . v = (x' - b_pre) . (W^T v): an index scoring u against stored codes ranks by decoded codes."""
    head = make_head(input_dim=12, hidden_dim=48, k=3, normalize=normalize)
    rng = np.random.default_rng(0)
    x, docs = rng.normal(size=(9, 12)).astype(np.float32), rng.normal(size=(200, 12)).astype(np.float32)
    u = project(head, x, batch_size=4)
    xs = head.standardize(torch.from_numpy(x))[0]
    want = ((xs - head.pre_bias) @ head.weight.T).detach().numpy()
    np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-6)
    codes = encode(head, docs, 3)
    index = InvertedIndex.build(codes, "ip")
    ids, scores = index.search(u, 5)
    stored = codes.to_dense().astype(np.float16).astype(np.float64)  # what the index keeps
    decoded = stored @ head.weight.detach().double().numpy()  # W^T v per document: (200, 12)
    brute = (xs - head.pre_bias).detach().double().numpy() @ decoded.T  # (9, 200)
    for r in range(len(x)):
        cand = np.flatnonzero(stored.any(axis=1))
        best = cand[np.argsort(-brute[r, cand], kind="stable")][:5]
        np.testing.assert_array_equal(ids[r], best)
        np.testing.assert_allclose(scores[r], brute[r, best], rtol=1e-4, atol=1e-5)


def test_project_refuses_what_encode_refuses(make_head):
    head = make_head()
    with pytest.raises(InputError, match="expects \\(n, 8\\)"):
        project(head, np.zeros((3, 7), dtype=np.float32))
    with pytest.raises(InputError, match="not finite|NaN|finite"):
        project(head, np.full((2, 8), np.nan, dtype=np.float32))
