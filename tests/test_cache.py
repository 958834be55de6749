"""The embedding cache: hits do not re-embed; a changed model or data set, or a damaged entry, re-embeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from csrv2.data.cache import EmbeddingCache, fingerprint


class CountingBackbone:
    """Embeds a text as (len, number of vowels, identity salt); counts how many texts it embedded."""

    def __init__(self, identity: str = "model-a"):
        self.identity, self.name, self.calls = identity, identity, 0

    def embed(self, texts, progress=True):
        self.calls += len(texts)
        salt = float(len(self.identity))
        return np.array([[len(t), sum(c in "aeiou" for c in t), salt] for t in texts], dtype=np.float32)


TEXTS = ["a cat", "two dogs", "the quick brown fox"]


def test_second_get_reads_the_cache(tmp_path):
    cache, backbone = EmbeddingCache(tmp_path), CountingBackbone()
    first = cache.get(backbone, TEXTS)
    again = cache.get(backbone, TEXTS)
    assert backbone.calls == 3
    np.testing.assert_array_equal(first, again)
    assert first[2, 0] == len(TEXTS[2])


def test_changed_data_or_model_embeds_again(tmp_path):
    cache, backbone = EmbeddingCache(tmp_path), CountingBackbone()
    cache.get(backbone, TEXTS)
    cache.get(backbone, TEXTS[:2] + ["the quick brown fox!"])
    assert backbone.calls == 6
    other = CountingBackbone("model-bb")
    x = cache.get(other, TEXTS)
    assert other.calls == 3 and x[0, 2] == len("model-bb")


def test_fingerprint_sees_text_boundaries_and_array_shape():
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
    a = np.arange(6, dtype=np.uint8)
    assert fingerprint(a) != fingerprint(a.reshape(2, 3))
    assert fingerprint(["x"]) == fingerprint(["x"])


@pytest.mark.parametrize("damage", ["truncate", "flip", "other_model", "no_json"])
def test_damaged_entry_is_reported_and_rebuilt(tmp_path, damage):
    cache, backbone = EmbeddingCache(tmp_path), CountingBackbone()
    expected = cache.get(backbone, TEXTS)
    array = next(tmp_path.glob("*.npy"))
    meta = array.with_suffix(".json")
    if damage == "truncate":
        array.write_bytes(array.read_bytes()[:-8])
    elif damage == "flip":
        data = bytearray(array.read_bytes())
        data[-1] ^= 0xFF
        array.write_bytes(bytes(data))
    elif damage == "other_model":
        info = json.loads(meta.read_text())
        meta.write_text(json.dumps({**info, "identity": "someone-else"}))
    else:
        meta.unlink()
    with pytest.warns(UserWarning, match="unusable"):
        x = cache.get(backbone, TEXTS)
    np.testing.assert_array_equal(x, expected)
    assert backbone.calls == 6
    cache.get(backbone, TEXTS)  # the rebuilt entry is whole again
    assert backbone.calls == 6


def test_leftover_temporary_files_are_not_entries(tmp_path):
    cache, backbone = EmbeddingCache(tmp_path), CountingBackbone()
    (tmp_path / ".deadbeef.123.tmp.npy").write_bytes(b"half")
    cache.get(backbone, TEXTS)
    assert backbone.calls == 3
    assert len(list(tmp_path.glob("[!.]*.npy"))) == 1
