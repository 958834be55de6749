"""Model folders: save_head/load_head round trips, sentence-transformers' SparseAutoEncoder folders, and every
hostile or broken folder refused in one line before anything of the config's size is allocated."""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from csrv2.cli import main
from csrv2.config import HeadConfig
from csrv2.errors import InputError
from csrv2.head import SparseHead
from csrv2.model import CONFIG_FILE, HEAD_KEYS, SETTINGS_FILE, WEIGHTS_FILE, load_head, read_settings, save_head


@pytest.fixture
def folder(tmp_path, make_head):
    """A saved 8 -> 32 head (k = 2) with random biases, and its settings."""
    return save_head(make_head(), tmp_path / "model", {"train": {"epochs": 3}, "note": "test"})


def write_config(folder, **changes):
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def write_weights(folder, **tensors):
    """Replace the weights file with these tensors (name with '.' written as '__')."""
    save_file({name.replace("__", "."): t for name, t in tensors.items()}, str(folder / WEIGHTS_FILE))


def weights(folder) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in load_head(folder).named_parameters()}


def one_line_error(folder, match: str) -> str:
    with pytest.raises(InputError, match=match) as info:
        load_head(folder)
    assert "\n" not in str(info.value)
    return str(info.value)


class Unpickled:
    """Unpickling this makes a folder: the proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, make_head, normalize):
    head = make_head(input_dim=8, hidden_dim=40, k=3, normalize=normalize, dead_threshold=7)
    save_head(head, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no settings asked for
    loaded = load_head(tmp_path / "m")
    assert loaded.config == head.config and not loaded.training
    for (name, a), (name2, b) in zip(head.named_parameters(), loaded.named_parameters(), strict=True):
        assert name == name2 and b.dtype == torch.float32 and b.requires_grad and torch.equal(a, b), name
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    for a, b in zip(head.encode(x), loaded.encode(x), strict=True):
        assert torch.equal(a, b)


def test_settings_round_trip(folder):
    assert read_settings(folder) == {"train": {"epochs": 3}, "note": "test"}
    (folder / SETTINGS_FILE).unlink()
    assert read_settings(folder) == {}  # a head from elsewhere has no csrv2.json


@pytest.mark.parametrize("text, match", [("[1, 2]", "not an object of settings"), ("{oops", "not valid JSON")])
def test_bad_settings_file_is_one_line(folder, text, match):
    (folder / SETTINGS_FILE).write_text(text)
    with pytest.raises(InputError, match=match):
        read_settings(folder)


def test_saving_into_an_existing_folder_replaces_the_files(folder, make_head):
    other = make_head(seed=5)
    save_head(other, folder)
    assert all(torch.equal(p, weights(folder)[name]) for name, p in other.named_parameters())
    assert read_settings(folder)["note"] == "test"  # settings not given are kept


def test_sentence_transformers_sparse_autoencoder_folder_loads(tmp_path):
    from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder

    config = {"input_dim": 8, "hidden_dim": 32, "k": 2, "k_aux": 4, "normalize": True, "dead_threshold": 11}
    sae = SparseAutoEncoder(**config)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sae.save(str(tmp_path))
    head = load_head(tmp_path)
    assert head.config.to_dict() == config
    theirs = sae.state_dict()
    for name, p in head.named_parameters():
        assert torch.equal(p, theirs[name]), name


def test_tied_weight_saved_under_the_decoders_name_loads(folder):
    saved = weights(folder)
    write_weights(folder, pre_bias=saved["pre_bias"], latent_bias=saved["latent_bias"], decoder__linear__weight=saved["encoder.weight"],
                  stats_last_nonzero=torch.zeros(32, dtype=torch.int64))
    assert torch.equal(load_head(folder).weight, saved["encoder.weight"])


def test_half_precision_weights_load_as_float32(folder):
    saved = weights(folder)
    write_weights(folder, **{name.replace(".", "__"): t.half() for name, t in saved.items()})
    loaded = weights(folder)
    for name, t in saved.items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], t.half().float()), name


# --- config.json -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key, text", [
    ("hidden_dim", "128.0"), ("hidden_dim", "true"), ("hidden_dim", '"128"'), ("hidden_dim", "null"), ("hidden_dim", "Infinity"),
    ("input_dim", "NaN"), ("k", "-Infinity"), ("k_aux", "[4]"), ("dead_threshold", "{}"),
])
def test_config_integers_of_another_json_type_are_refused(folder, key, text):
    config = json.loads((folder / CONFIG_FILE).read_text())
    raw = json.dumps({**config, key: "@"}).replace('"@"', text)  # Infinity and NaN as Python's json writes them
    (folder / CONFIG_FILE).write_text(raw)
    message = one_line_error(folder, f'"{key}" is .*not a whole number; write an integer')
    assert text.replace('"', "") in message


@pytest.mark.parametrize("value", [1, 0, "false", None])
def test_config_normalize_must_be_a_boolean(folder, value):
    write_config(folder, normalize=value)
    one_line_error(folder, '"normalize" is .*not a boolean; write true or false')


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_config_with_missing_or_extra_keys_is_refused(folder, change):
    config = json.loads((folder / CONFIG_FILE).read_text())
    if change == "missing":
        del config["k_aux"]
    else:
        config["topk_mode"] = "batch"
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    one_line_error(folder, "not a sparse head's")


@pytest.mark.parametrize("changes, match", [({"k": 0}, "k must be"), ({"hidden_dim": -1}, "hidden_dim must be"), ({"k": 33}, "k must be")])
def test_config_values_out_of_range_are_refused(folder, changes, match):
    write_config(folder, **changes)
    one_line_error(folder, f"invalid head config \\({match}")


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", "\xff\xfe", "[" * 100_000 + "]" * 100_000],
                         ids=["broken", "a list", "not UTF-8", "deep nesting"])
def test_config_that_is_not_a_json_object_is_refused(folder, text):
    (folder / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    one_line_error(folder, "not valid JSON|not a sparse head's|more than a model's JSON")


def test_huge_config_file_is_refused_unread(folder):
    with open(folder / CONFIG_FILE, "r+b") as f:
        f.truncate(2**40)  # sparse: a terabyte that takes no disk
    start = time.perf_counter()
    one_line_error(folder, "more than a model's JSON")
    assert time.perf_counter() - start < 1


# --- weights ---------------------------------------------------------------------------------------


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def test_huge_hidden_dim_with_tiny_weights_fails_fast_and_allocates_nothing(folder):
    write_config(folder, hidden_dim=10**9)  # 10^9 x 8 floats: 32 GB for W alone, above what a head may have
    assert "above the 2**31 a head may have" in one_line_error(folder, "invalid head config")
    write_config(folder, hidden_dim=2**28)  # the largest head allowed at d = 8: 8 GiB for W, from a 1 KB file
    before, start = max_rss_mb(), time.perf_counter()
    message = one_line_error(folder, "the files do not belong together")
    assert time.perf_counter() - start < 1 and max_rss_mb() - before < 100
    assert "(268435456, 8)" in message and "(32, 8)" in message


def test_safetensors_header_claiming_huge_shapes_is_refused_fast(folder):
    """The config and the header agree on 2^28 latents, but the file is tiny: safetensors refuses the header."""
    h = 2**28
    write_config(folder, hidden_dim=h)
    header = {"pre_bias": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
              "encoder.weight": {"dtype": "F32", "shape": [h, 8], "data_offsets": [32, 32 + 4 * 8 * h]},
              "latent_bias": {"dtype": "F32", "shape": [h], "data_offsets": [32 + 4 * 8 * h, 32 + 4 * 9 * h]}}
    raw = json.dumps(header).encode()
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    before, start = max_rss_mb(), time.perf_counter()
    one_line_error(folder, "not a readable safetensors file")
    assert time.perf_counter() - start < 1 and max_rss_mb() - before < 100


def test_header_length_beyond_the_file_is_refused(folder):
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 2**62) + b"{}")
    one_line_error(folder, "not a readable safetensors file")


def test_truncated_weights_file_is_refused(folder):
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) - 20])
    one_line_error(folder, "not a readable safetensors file")


@pytest.mark.parametrize("case", ["wrong input_dim", "missing tensor", "extra tensor", "transposed weight"])
def test_weights_that_do_not_match_the_config_are_refused(folder, case):
    saved = {name.replace(".", "__"): t for name, t in weights(folder).items()}
    if case == "wrong input_dim":
        write_config(folder, input_dim=16)
    elif case == "missing tensor":
        del saved["latent_bias"]
    elif case == "extra tensor":
        saved["scale"] = torch.ones(3)
    else:
        saved["encoder__weight"] = saved["encoder__weight"].T.contiguous()
    write_weights(folder, **saved)
    one_line_error(folder, "the files do not belong together")


def test_integer_weights_are_refused(folder):
    saved = {name.replace(".", "__"): t for name, t in weights(folder).items()}
    write_weights(folder, **{**saved, "latent_bias": torch.zeros(32, dtype=torch.int32)})
    one_line_error(folder, "latent_bias is I32, not F16/BF16/F32/F64")


@pytest.mark.parametrize("name, bad", [("encoder.weight", float("nan")), ("latent_bias", float("inf")), ("pre_bias", -float("inf")),
                                       ("encoder.weight", 1e300)])
def test_non_finite_weights_are_refused(folder, name, bad):
    saved = weights(folder)
    saved[name] = saved[name].double()  # float64 1e300 is finite, but inf once cast to float32
    saved[name].view(-1)[3] = bad
    write_weights(folder, **{n.replace(".", "__"): t for n, t in saved.items()})
    one_line_error(folder, "has non-finite weights \\(NaN or Inf\\); it cannot encode anything meaningful; train it again")


@pytest.mark.parametrize("as_weights_file", [False, True])
def test_pickles_are_refused_never_unpickled(folder, tmp_path, as_weights_file):
    marker = tmp_path / "unpickled"
    (folder / WEIGHTS_FILE).unlink()
    if as_weights_file:  # a torch.save file named model.safetensors
        torch.save({"obj": Unpickled(marker)}, folder / WEIGHTS_FILE)
        one_line_error(folder, "is a pickle/torch.save file, not safetensors; csrv2 never loads pickles")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Unpickled(marker)))
        one_line_error(folder, "found pytorch_model.bin, a pickle, which csrv2 never loads")
    assert not marker.exists()


def test_not_a_model_folder(tmp_path, folder):
    one_line_error(tmp_path / "nowhere", "no such model folder")
    (folder / CONFIG_FILE).unlink()
    one_line_error(folder, "has no config.json")


# --- the CLI refuses a diverged model -----------------------------------------------------------------


@pytest.mark.parametrize("command", [["encode"], ["index", "build"]])
def test_cli_refuses_a_model_with_non_finite_weights(folder, tmp_path, capsys, command):
    saved = weights(folder)
    saved["encoder.weight"][0, 0] = float("nan")
    write_weights(folder, **{n.replace(".", "__"): t for n, t in saved.items()})
    np.save(tmp_path / "e.npy", np.ones((4, 8), dtype=np.float32))
    out = tmp_path / "out.npz"
    assert main([*command, "--model", str(folder), "--embeddings", str(tmp_path / "e.npy"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("csrv2: error: ") and "\n" not in err and "non-finite weights" in err
    assert not out.exists()


def test_head_keys_are_the_sparse_autoencoders():
    assert set(HEAD_KEYS) == set(HeadConfig(input_dim=4).to_dict())
    assert set(SparseHead(HeadConfig(input_dim=4)).state_dict()) == {"pre_bias", "encoder.weight", "latent_bias"}
