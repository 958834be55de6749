"""`csrv2 train` / `csrv2 encode` end to end, and every bad input: one line on stderr, exit 2, nothing lost."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from csrv2 import SparseCodes, load
from csrv2.cli import main

TRAIN = ["--hidden-dim", "64", "--epochs", "2", "--batch-size", "32", "--no-progress"]


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    y = rng.integers(0, 4, 128)
    x = (centres[y] + 0.3 * rng.normal(size=(128, 16))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "e.npy", x)
    np.save(tmp_path / "y.npy", y)
    return tmp_path


@pytest.fixture()
def model(files):
    assert main(["train", "--embeddings", str(files / "e.npy"), "--labels", str(files / "y.npy"), "--k", "2",
                 "--out", str(files / "model"), *TRAIN]) == 0
    return files / "model"


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("csrv2: error: ") and "\n" not in err, err
    return err


def test_train_then_encode(files, model, capsys):
    assert main(["encode", "--model", str(model), "--embeddings", str(files / "e.npy"), "--out", str(files / "c.npz")]) == 0
    with np.load(files / "c.npz") as f:
        assert f["indices"].shape == f["values"].shape == (128, 2)
        assert f["indices"].dtype == np.int32 and f["values"].dtype == np.float32
    codes = SparseCodes.load(files / "c.npz")
    nnz = codes.nnz_per_row()
    # exactly k non-zeros, fewer only where ReLU zeroed a negative pre-activation
    assert ((nnz == 2) | (codes.values.min(axis=1) == 0)).all() and (nnz == 2).mean() > 0.9
    head = load(model)
    assert head.config.k == 2 and head.config.hidden_dim == 64
    # any k at inference
    assert main(["encode", "--model", str(model), "--embeddings", str(files / "e.npy"), "--k", "5", "--out", str(files / "c5.npz")]) == 0
    assert SparseCodes.load(files / "c5.npz").k == 5


def test_npz_with_named_arrays_and_pairs(files, capsys):
    x = np.load(files / "e.npy")
    np.savez(files / "d.npz", embeddings=x, labels=np.load(files / "y.npy").astype(str))
    assert main(["train", "--embeddings", str(files / "d.npz"), "--k", "2", "--out", str(files / "m1"), *TRAIN]) == 0
    np.savez(files / "p.npz", queries=x, documents=x[::-1].copy())
    assert main(["train", "--embeddings", str(files / "p.npz"), "--preset", "csr", "--contrastive", "pairs", "--k", "2",
                 "--out", str(files / "m2"), *TRAIN]) == 0
    err = error_of(capsys, ["train", "--embeddings", str(_npz(files, other=x)), "--out", str(files / "m3"), *TRAIN])
    assert "found arrays ['other']" in err and "embeddings" in err


def _npz(folder, **arrays):
    np.savez(folder / "x.npz", **arrays)
    return folder / "x.npz"


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "csrv2", "train", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ["--k-init", "--decay-ratio", "--aux-coef", "--cl-coef", "--temperature", "--contrastive",
                   "--checkpoint-every", "--dead-threshold", "--k-aux", "--preset", "--resume"]:
        line = out[out.index(option):]
        assert len(line.split("\n")[0]) > len(option) + 10 or len(line.split("\n")[1].strip()) > 10, option


def test_bad_training_files(files, capsys):
    x = np.load(files / "e.npy")
    train = ["train", "--out", str(files / "run"), *TRAIN]
    bad = x.copy()
    bad[7, 0] = np.nan
    np.save(files / "nan.npy", bad)
    assert "row 7 has NaN or Inf" in error_of(capsys, [*train, "--embeddings", str(files / "nan.npy")])
    np.save(files / "short.npy", np.arange(5))
    assert "labels have shape (5,) but there are 128" in error_of(
        capsys, [*train, "--embeddings", str(files / "e.npy"), "--labels", str(files / "short.npy")])
    (files / "empty.npy").write_bytes(b"")
    assert "empty" in error_of(capsys, [*train, "--embeddings", str(files / "empty.npy")])
    (files / "junk.npy").write_bytes(b"not a numpy file at all")
    assert "cannot be read" in error_of(capsys, [*train, "--embeddings", str(files / "junk.npy")])
    (files / "obj.npy").write_bytes(pickle.dumps(x))
    assert "pickled" in error_of(capsys, [*train, "--embeddings", str(files / "obj.npy")])
    assert "no such file" in error_of(capsys, [*train, "--embeddings", str(files / "missing.npy")])
    np.save(files / "zero.npy", np.zeros((0, 16), np.float32))
    assert "empty" in error_of(capsys, [*train, "--embeddings", str(files / "zero.npy")])
    assert "k must be an integer in [1, hidden_dim=64]" in error_of(capsys, [*train, "--embeddings", str(files / "e.npy"), "--k", "0"])
    assert "k must be an integer in [1, hidden_dim=64]" in error_of(capsys, [*train, "--embeddings", str(files / "e.npy"), "--k", "65"])
    assert "k_init (2) must be >= k (4)" in error_of(
        capsys, [*train, "--embeddings", str(files / "e.npy"), "--k", "4", "--k-init", "2"])
    assert "not available on this machine" in error_of(capsys, [*train, "--embeddings", str(files / "e.npy"), "--device", "mps"])
    assert "not a device name" in error_of(capsys, [*train, "--embeddings", str(files / "e.npy"), "--device", "gpu0"])
    assert not (files / "run").exists()  # every refusal came before any work


def test_bad_model_folders(files, model, capsys):
    encode = ["encode", "--embeddings", str(files / "e.npy"), "--out", str(files / "c.npz")]
    np.save(files / "wide.npy", np.ones((3, 32), np.float32))
    assert "expects (n, 16)" in error_of(capsys, ["encode", "--model", str(model), "--embeddings", str(files / "wide.npy"),
                                                  "--out", str(files / "c.npz")])
    assert "k must be an integer in [1, hidden_dim=64]" in error_of(capsys, [*encode, "--model", str(model), "--k", "65"])
    assert "no such model folder" in error_of(capsys, [*encode, "--model", str(files / "nope")])
    assert "batch_size must be >= 1" in error_of(capsys, [*encode, "--model", str(model), "--batch-size", "0"])

    other = files / "other"
    other.mkdir()
    (other / "config.json").write_text('{"hidden_size": 768, "model_type": "bert"}')
    assert "another tool" in error_of(capsys, [*encode, "--model", str(other)])

    broken = files / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model / "config.json").read_text())
    assert "has no model.safetensors" in error_of(capsys, [*encode, "--model", str(broken)])
    (broken / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    assert "pickle" in error_of(capsys, [*encode, "--model", str(broken)])
    (broken / "model.safetensors").write_bytes(pickle.dumps({"w": 1}))
    assert "pickle" in error_of(capsys, [*encode, "--model", str(broken)])
    assert not (files / "c.npz").exists()


def test_failed_encode_keeps_the_old_output(files, model, capsys):
    out = files / "c.npz"
    assert main(["encode", "--model", str(model), "--embeddings", str(files / "e.npy"), "--out", str(out)]) == 0
    before = out.read_bytes()
    bad = np.load(files / "e.npy")
    bad[100] = np.inf
    np.save(files / "bad.npy", bad)
    error_of(capsys, ["encode", "--model", str(model), "--embeddings", str(files / "bad.npy"), "--out", str(out)])
    assert out.read_bytes() == before
    assert sorted(p.name for p in files.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_index_build_then_search(files, model, capsys):
    from csrv2 import InvertedIndex, encode, project
    from csrv2.config import DEFAULT_QUERY_K

    index_file = files / "docs.index"
    assert main(["index", "build", "--model", str(model), "--embeddings", str(files / "e.npy"), "--out", str(index_file),
                 "--no-progress"]) == 0
    assert main(["search", "--index", str(index_file), "--model", str(model), "--queries", str(files / "e.npy"),
                 "--top-n", "3", "--out", str(files / "hits.npz"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "query 0: " in printed and "118 more queries" in printed
    x = np.load(files / "e.npy")
    head = load(model)
    index = InvertedIndex.build(encode(head, x), metric="cosine")  # documents at the model's k = 2
    for flags, queries in (([], encode(head, x, DEFAULT_QUERY_K)), (["--k", "2"], encode(head, x, 2)), (["--dense"], project(head, x))):
        assert main(["search", "--index", str(index_file), "--model", str(model), "--queries", str(files / "e.npy"),
                     "--top-n", "3", "--out", str(files / "hits.npz"), "--no-progress", *flags]) == 0
        want_ids, want_scores = index.search(queries, 3)
        with np.load(files / "hits.npz") as hits:
            np.testing.assert_array_equal(hits["ids"], want_ids)
            np.testing.assert_allclose(hits["scores"], want_scores)
    assert "drop query k or dense" in error_of(capsys, ["search", "--index", str(index_file), "--model", str(model),
                                                        "--queries", str(files / "e.npy"), "--dense", "--k", "8"])

    (files / "bad.index").write_bytes(b"not an index")
    assert "not a csrv2 index file" in error_of(capsys, ["search", "--index", str(files / "bad.index"), "--model", str(model),
                                                         "--queries", str(files / "e.npy")])
    assert main(["train", "--embeddings", str(files / "e.npy"), "--k", "2", "--out", str(files / "wide"),
                 "--hidden-dim", "32", "--epochs", "1", "--no-progress"]) == 0
    err = error_of(capsys, ["search", "--index", str(index_file), "--model", str(files / "wide"), "--queries", str(files / "e.npy")])
    assert "another head" in err  # a head of another width is another head


@pytest.mark.parametrize("command", ["train", "encode", "index build", "search", "embed", "export", "finetune", "reproduce"])
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0 and "--" in capsys.readouterr().out


def test_finetune_help_shows_the_k_it_uses(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    help_k = capsys.readouterr().out.split("\n  --k K", 1)[1].split("\n  --", 1)[0]  # its entry, not the usage line
    assert "(default: 2)" in " ".join(help_k.split())


def test_query_text_that_is_not_utf8_is_one_line(files, model, capsys):
    # argv that is not UTF-8 reaches Python as lone surrogates (PEP 383); a tokenizer would raise a TypeError on them
    run = subprocess.run([sys.executable, "-m", "csrv2", "search", "--index", str(files / "none.index"), "--model", str(model), b"\xff"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("csrv2: error: query 1") and "not UTF-8 text" in run.stderr
    assert "not UTF-8 text" in error_of(capsys, ["search", "--index", str(files / "none.index"), "--model", str(model), "ok", "caf\udce9"])


def test_encode_refuses_empty_and_non_float_arrays_before_writing(files, model, capsys):
    encode = ["encode", "--model", str(model), "--out", str(files / "c.npz")]
    np.save(files / "none.npy", np.zeros((0, 16), np.float32))
    assert "has no rows" in error_of(capsys, [*encode, "--embeddings", str(files / "none.npy")])
    for dtype in (np.int64, np.complex64):
        np.save(files / "odd.npy", np.ones((4, 16), dtype))
        err = error_of(capsys, [*encode, "--embeddings", str(files / "odd.npy")])
        assert f"embeddings have dtype {np.dtype(dtype)}; embeddings must be float16/32/64" in err  # the message train gives
    assert main(["index", "build", "--model", str(model), "--embeddings", str(files / "e.npy"), "--out", str(files / "x.index")]) == 0
    assert "has no rows" in error_of(capsys, ["search", "--index", str(files / "x.index"), "--model", str(model),
                                              "--queries", str(files / "none.npy")])
    assert not (files / "c.npz").exists()


def test_an_output_folder_is_refused_before_any_work(files, model, capsys, monkeypatch):
    import csrv2.model

    (files / "out.npz").mkdir()
    monkeypatch.setattr(csrv2.model, "encode", lambda *a, **k: pytest.fail("encoded before the output was checked"))
    for argv in (["encode", "--embeddings", str(files / "e.npy"), "--out", str(files / "out.npz")],
                 ["index", "build", "--embeddings", str(files / "e.npy"), "--out", str(files / "out.npz")],
                 ["search", "--index", str(files / "none.index"), "--queries", str(files / "e.npy"), "--out", str(files / "out.npz")]):
        assert "out.npz: is a folder; pass a file path" in error_of(capsys, [*argv, "--model", str(model)])
    assert list((files / "out.npz").iterdir()) == []


def test_finetune_passes_k_through_so_k_below_one_is_refused(files, capsys):
    table = files / "t.csv"
    table.write_text("text,label\n" + "".join(f"text number {i},{i % 2}\n" for i in range(4)))
    argv = ["finetune", "--data", str(table), "--out", str(files / "ft"), "--epochs", "1", "--no-progress"]
    for k in ("0", "-1"):
        assert main([*argv, "--k", k]) == 2
        # the last line: loading the backbone's weights may draw a progress bar (transformers') above it
        assert capsys.readouterr().err.splitlines()[-1] == f"csrv2: error: k must be an integer in [1, hidden_dim=1536], got {k}"
    assert not (files / "ft").exists()


def test_finetune_k_default_lives_in_one_place():
    import inspect

    from csrv2.finetune import DEFAULT_K, Finetuner

    assert inspect.signature(Finetuner).parameters["k"].default == DEFAULT_K == 2


def test_main_says_every_bad_input_error_in_one_line(capsys, monkeypatch):
    import csrv2.cli

    errors = [UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), FileNotFoundError("no such file: x"),
              ValueError("first line\nsecond line")]
    for error in errors:
        def fail(args, error=error):
            raise error

        monkeypatch.setitem(csrv2.cli.COMMANDS, "export", fail)
        err = error_of(capsys, ["export", "--model", "m", "--out", "o"])
        assert err.removeprefix("csrv2: error: ") == " ".join(str(error).splitlines())


def test_search_refuses_an_index_built_with_another_head(files, model, capsys):
    """An index built from embeddings records its head; a search with another head of the same shape is refused."""
    x, index, other = str(files / "e.npy"), str(files / "i.index"), str(files / "other")
    assert main(["index", "build", "--model", str(model), "--embeddings", x, "--out", index, "--no-progress"]) == 0
    assert main(["train", "--embeddings", x, "--labels", str(files / "y.npy"), "--k", "2", "--seed", "1", "--out", other, *TRAIN]) == 0
    capsys.readouterr()
    assert "another head" in error_of(capsys, ["search", "--index", index, "--model", other, "--queries", x])
    assert main(["search", "--index", index, "--model", str(model), "--queries", x]) == 0
