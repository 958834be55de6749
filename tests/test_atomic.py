"""The one writer: a file or folder appears whole or not at all, whatever fails and whoever else writes the same path."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from csrv2.atomic import write_bytes, write_file, write_folder, write_json, write_text
from csrv2.codes import SparseCodes
from csrv2.errors import InputError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "data.bin"
    write_bytes(path, b"old")

    def half_then_fail(f):
        f.write(b"new, but only ha")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_file(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]
    with pytest.raises(KeyboardInterrupt):  # an interrupt cleans up the same way
        write_file(tmp_path / "fresh.bin", lambda f: (_ for _ in ()).throw(KeyboardInterrupt))
    assert os.listdir(tmp_path) == ["data.bin"]


def test_writes_are_whole_readable_files(tmp_path):
    write_json(tmp_path / "sub" / "a.json", {"b": 1, "a": [1, 2]})  # parents are made
    assert (tmp_path / "sub" / "a.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    write_json(tmp_path / "line.json", {"b": 1, "a": 2}, indent=None)
    assert (tmp_path / "line.json").read_text() == '{"a": 2, "b": 1}\n'
    write_text(tmp_path / "t.txt", "é")
    assert (tmp_path / "t.txt").read_bytes() == "é".encode()
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o644  # readable by others, unlike mkstemp's 0o600


def test_temporary_names_are_unique_per_writer(tmp_path):
    path = tmp_path / "codes.npz"
    seen = []

    def outer(f):
        f.write(b"outer")
        # a second writer of the same path while the first is open, in the same process: its own temporary
        write_file(path, lambda g: (seen.append(sorted(os.listdir(tmp_path))), g.write(b"inner")))

    write_file(path, outer)
    (temporaries,) = seen
    assert len(temporaries) == 2 and len(set(temporaries)) == 2
    assert all(name.startswith(f".codes.npz.{os.getpid()}.") and name.endswith(".tmp") for name in temporaries)
    assert path.read_bytes() == b"outer"  # the last rename wins
    assert os.listdir(tmp_path) == ["codes.npz"]


def _codes(seed: int) -> SparseCodes:
    rng = np.random.default_rng(seed)
    return SparseCodes(rng.integers(0, 4096, (20000, 8)).astype(np.int32), rng.random((20000, 8), dtype=np.float32), 4096)


def _save_rounds(path: str, seed: int, rounds: int, start) -> None:
    codes = _codes(seed)
    start.wait()
    for _ in range(rounds):
        codes.save(path)


def test_two_processes_writing_one_path_leave_one_whole_file(tmp_path):
    path = tmp_path / "codes.npz"
    expected = [_codes(1), _codes(2)]
    # forked writers start at once; spawned ones would import csrv2 (and torch) again first, seconds each
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    start = context.Barrier(3)
    writers = [context.Process(target=_save_rounds, args=(str(path), seed, 20, start)) for seed in (1, 2)]
    for w in writers:
        w.start()
    start.wait()
    reads = 0
    while any(w.is_alive() for w in writers):  # read while they write: every read is one writer's whole file
        if path.exists():
            got = SparseCodes.load(path)
            assert any(np.array_equal(got.indices, e.indices) and np.array_equal(got.values, e.values) for e in expected)
            reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    final = SparseCodes.load(path)
    assert any(np.array_equal(final.indices, e.indices) and np.array_equal(final.values, e.values) for e in expected)
    assert reads > 0 and os.listdir(tmp_path) == ["codes.npz"]


def _fill(files: dict[str, str]):
    def fill(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).write_text(text)

    return fill


def test_write_folder_replaces_a_folder_whole(tmp_path):
    out = tmp_path / "model"
    write_folder(out, _fill({"a.txt": "1", "b.txt": "2"}))
    assert sorted(os.listdir(out)) == ["a.txt", "b.txt"] and out.stat().st_mode & 0o777 == 0o755
    with pytest.raises(InputError, match="already exists; choose another folder or pass --overwrite"):
        write_folder(out, _fill({"c.txt": "3"}))
    write_folder(out, _fill({"c.txt": "3"}), overwrite=True)
    assert os.listdir(out) == ["c.txt"]  # nothing of the old folder is left in the new one
    assert os.listdir(tmp_path) == ["model"]  # nor beside it

    def fail(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_folder(out, fail, overwrite=True)
    assert os.listdir(out) == ["c.txt"] and (out / "c.txt").read_text() == "3"
    assert os.listdir(tmp_path) == ["model"]


def test_writing_to_a_folder_path_is_one_line(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match=r"taken: is a folder; pass a file path to write") as info:
        write_bytes(tmp_path / "taken", b"x")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="is a folder"):
        SparseCodes(np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32), 2).save(tmp_path / "taken")
    assert os.listdir(tmp_path / "taken") == []
