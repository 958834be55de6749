"""csrv2.codes: SparseCodes converters and files, and batched encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csrv2.codes import SparseCodes
from csrv2.errors import InputError
from csrv2.head import encode


@pytest.fixture
def codes() -> SparseCodes:
    """3 codes, k = 2, dim 5, with explicit zeros (ReLU'd slots) in rows 1 and 2."""
    indices = np.array([[3, 1], [0, 2], [4, 0]], dtype=np.int32)
    values = np.array([[2.0, 1.0], [5.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    return SparseCodes(indices, values, 5)


DENSE = np.array(
    [
        [0, 1, 0, 2, 0],
        [5, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ],
    dtype=np.float32,
)


def test_shape_properties(codes):
    assert len(codes) == 3 and codes.k == 2 and codes.dim == 5
    assert codes.nnz_per_row().tolist() == [2, 1, 0]


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        SparseCodes(np.zeros((2, 3), np.int32), np.zeros((2, 2), np.float32), 4)
    with pytest.raises(ValueError):
        SparseCodes(np.zeros(3, np.int32), np.zeros(3, np.float32), 4)


def test_to_dense_by_hand(codes):
    dense = codes.to_dense()
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense, DENSE)


def test_to_scipy_agrees_and_drops_zeros(codes):
    m = codes.to_scipy()
    assert m.shape == (3, 5)
    assert m.nnz == 3  # the three explicit zeros are gone
    assert (m.data != 0).all()
    np.testing.assert_array_equal(m.toarray(), DENSE)


def test_to_torch_agrees_and_drops_zeros(codes):
    t = codes.to_torch()
    assert t.is_sparse and t.is_coalesced()
    assert t.shape == (3, 5)
    assert t._nnz() == 3
    assert (t.values() != 0).all()
    np.testing.assert_array_equal(t.to_dense().numpy(), DENSE)


def test_converters_agree_on_encoded_codes(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32)
    with torch.no_grad():
        head.latent_bias.sub_(0.5)  # some top-k values become 0 after ReLU
    c = encode(head, embeddings(20, 8), 4, progress=False)
    dense = c.to_dense()
    np.testing.assert_array_equal(c.to_scipy().toarray(), dense)
    np.testing.assert_array_equal(c.to_torch().to_dense().numpy(), dense)
    assert c.to_scipy().nnz == c.to_torch()._nnz() == int(c.nnz_per_row().sum()) == int((dense != 0).sum())


@pytest.mark.parametrize("name", ["codes.npz", "codes"])
def test_save_load_round_trip(codes, tmp_path, name):
    path = tmp_path / name
    codes.save(path)
    back = SparseCodes.load(path)
    assert back.dim == codes.dim
    assert back.indices.dtype == codes.indices.dtype and back.values.dtype == codes.values.dtype
    np.testing.assert_array_equal(back.indices, codes.indices)
    np.testing.assert_array_equal(back.values, codes.values)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left behind


def test_load_garbage_raises_input_error(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(InputError, match="bad.npz"):
        SparseCodes.load(path)


# --- encode ---------------------------------------------------------------------------------------


def test_encode_batched_equals_unbatched(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32)
    x = embeddings(10, 8)
    whole = encode(head, x, 3, batch_size=100, progress=False)
    batched = encode(head, x, 3, batch_size=3, progress=False)  # 4 batches, the last of 1 row
    np.testing.assert_array_equal(batched.indices, whole.indices)
    # BLAS may sum in another order for another batch shape: equal up to float32 rounding
    np.testing.assert_allclose(batched.values, whole.values, rtol=1e-6, atol=1e-6)
    assert whole.indices.dtype == np.int32 and whole.values.dtype == np.float32 and whole.dim == 32
    # and both equal the head's own encode
    idx, val = head.encode(x, 3)
    np.testing.assert_array_equal(whole.indices, idx.numpy())
    np.testing.assert_allclose(whole.values, val.numpy(), rtol=1e-6, atol=1e-6)


def test_encode_accepts_numpy_and_default_k(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32, k=2)
    x = embeddings(5, 8)
    from_numpy = encode(head, x.numpy().astype(np.float64), progress=False)
    from_torch = encode(head, x, progress=False)
    assert from_numpy.k == 2
    np.testing.assert_array_equal(from_numpy.indices, from_torch.indices)
    np.testing.assert_allclose(from_numpy.values, from_torch.values)


def test_encode_rows_have_k_nonzeros_except_relu_zeros(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32)
    with torch.no_grad():
        head.latent_bias.sub_(1.0)  # push many pre-activations below 0
    x = embeddings(30, 8)
    k = 5
    c = encode(head, x, k, progress=False)
    pre = (x.double() - head.pre_bias.detach().double()) @ head.encoder.weight.detach().double().T + head.latent_bias.detach().double()
    kth = pre.sort(dim=1, descending=True).values[:, :k]  # the top-k pre-activations of each row
    nnz = c.nnz_per_row()
    assert (nnz <= k).all()
    assert (nnz < k).any() and (nnz > 0).any()  # the example covers both cases
    # a row has fewer than k non-zeros exactly where its top-k pre-activations are <= 0
    np.testing.assert_array_equal(nnz, (kth > 0).sum(dim=1).numpy())
    assert (c.values >= 0).all()
    assert all(len(set(row)) == k for row in c.indices.tolist())  # distinct latents per row


def test_encode_nan_row_raises_naming_the_row(make_head, embeddings):
    head = make_head(input_dim=8, hidden_dim=32)
    x = embeddings(10, 8)
    x[7, 2] = float("nan")
    with pytest.raises(InputError, match=r"row 7\b"):
        encode(head, x, 2, batch_size=3, progress=False)  # row 7 sits in the third batch
    x[7, 2] = 0.0
    x[1, 0] = float("inf")
    with pytest.raises(InputError, match=r"row 1\b"):
        encode(head, x.numpy(), 2, batch_size=4, progress=False)


@pytest.mark.parametrize("shape", [(4, 7), (4, 9), (8,)])
def test_encode_wrong_dimension_raises_input_error(make_head, shape):
    head = make_head(input_dim=8, hidden_dim=32)
    with pytest.raises(InputError, match="8"):
        encode(head, np.zeros(shape, np.float32), 2, progress=False)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not a zip at all"])
def test_load_refuses_damaged_files_in_one_line(tmp_path, content):
    path = tmp_path / "codes.npz"
    path.write_bytes(content)
    with pytest.raises(InputError, match="not a csrv2 codes file") as e:
        SparseCodes.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("array", [
    np.ones((4, 8), np.int64), np.ones((4, 8), bool), np.ones((4, 8), np.complex64), np.ones((4, 8), np.uint8),
    torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.bool), torch.ones(4, 8, dtype=torch.complex64),
], ids=["int64", "bool", "complex64", "uint8", "torch int32", "torch bool", "torch complex64"])
def test_encode_refuses_non_float_dtypes_like_training(make_head, array):
    with pytest.raises(InputError, match=r"^embeddings have dtype \S+; embeddings must be float16/32/64$"):
        encode(make_head(), array, progress=False)


@pytest.mark.parametrize("array", [np.zeros((0, 8), np.float32), torch.zeros(0, 8)], ids=["numpy", "torch"])
def test_encode_refuses_no_rows(make_head, array):
    with pytest.raises(InputError, match="^embeddings has no rows; pass at least one embedding$"):
        encode(make_head(), array, progress=False)


def test_encode_accepts_half_and_double_precision(make_head, embeddings):
    head, x = make_head(), embeddings(6, 8).half().float()  # values exact in every float type
    expected = encode(head, x, progress=False)
    for array in (x.double(), x.numpy().astype(np.float64), x.half(), x.numpy().astype(np.float16)):
        codes = encode(head, array, progress=False)
        np.testing.assert_array_equal(codes.indices, expected.indices)
        np.testing.assert_array_equal(codes.values, expected.values)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_encode_refuses_float64_beyond_float32_range_naming_the_row(make_head, embeddings, as_tensor):
    x = embeddings(10, 8).double()
    x[6, 3] = 1e300  # finite in float64, inf once cast to float32
    with pytest.raises(InputError, match=r"^embeddings row 6 has values beyond float32's range"):
        encode(make_head(), x if as_tensor else x.numpy(), batch_size=4, progress=False)


def test_encode_never_returns_non_finite_codes(make_head, embeddings):
    head = make_head()
    with torch.no_grad():
        head.encoder.weight.mul_(1e37)  # finite weights whose products with ordinary inputs overflow float32
    with pytest.raises(InputError, match=r"row \d+ gives non-finite codes: the model's pre-activations overflow float32"):
        encode(head, embeddings(3, 8) * 100, progress=False)
