"""Backbones on the packaged models, offline: shapes, identities that key the cache, bad model folders."""

from __future__ import annotations

import numpy as np
import pytest

from csrv2.data.backbones import ImageBackbone, TextBackbone, resolve_text_model
from csrv2.errors import InputError


@pytest.fixture(scope="module")
def minilm():
    return TextBackbone(max_seq_length=64)


def test_default_text_model_is_the_packaged_minilm(minilm):
    source, local = resolve_text_model(None)
    assert local and source == resolve_text_model("all-MiniLM-L6-v2")[0]
    x = minilm.embed(["a cat sits on the mat", "stocks fell sharply", "a kitten on a rug"], progress=False)
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert x[0] @ x[2] > x[0] @ x[1]  # real weights: the two cat sentences are the closest


def test_identity_is_stable_and_sees_settings(minilm):
    assert TextBackbone(max_seq_length=64).identity == minilm.identity
    assert TextBackbone(max_seq_length=32).identity != minilm.identity


def test_bad_model_folders_are_refused(tmp_path):
    with pytest.raises(InputError, match="not a sentence-transformers model folder"):
        resolve_text_model(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        resolve_text_model(str(tmp_path / "missing" / "model"))
    assert resolve_text_model("someone/some-model") == ("someone/some-model", False)  # a hub name, for users online


def test_image_backbone_embeds_gray_and_colour():
    backbone = ImageBackbone(image_size=32, batch_size=3)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    x = backbone.embed(gray, progress=False)
    assert x.shape == (4, 1280) and np.isfinite(x).all()
    colour = np.repeat(gray[..., None], 3, axis=3)
    np.testing.assert_allclose(backbone.embed(colour, progress=False), x, atol=1e-5)  # gray is repeated to 3 channels
    np.testing.assert_allclose(backbone.embed(gray.astype(np.float32) / 255, progress=False), x, atol=1e-4)
    assert backbone.preprocess(gray).shape == (4, 3, 32, 32)
    assert backbone.identity == ImageBackbone(image_size=32).identity != ImageBackbone(image_size=64).identity


@pytest.mark.parametrize("shape", [(4, 8), (4, 8, 8, 2), (0, 8, 8)])
def test_image_backbone_refuses_bad_shapes(shape):
    with pytest.raises(InputError, match="pass \\(n, H, W\\) gray"):
        ImageBackbone(image_size=32).embed(np.zeros(shape, dtype=np.uint8), progress=False)
