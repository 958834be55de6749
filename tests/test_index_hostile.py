"""csrv2.search.index against hostile input: crafted files whose checksum is valid, a reader racing a writer on
the same path, absurd top_n, and a search with another head than the one the index was built with."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import csrv2
import csrv2.search.index as index_module
from csrv2.codes import SparseCodes
from csrv2.errors import InputError
from csrv2.head import encode
from csrv2.model import save_head
from csrv2.search.index import CRC, FIELDS, HEADER_SIZE, MAX_VECTORS, InvertedIndex, pack_ids
from test_index import SEARCH_PATHS, random_codes  # the tests folder is on sys.path (pytest's prepend import mode)

CRC_AT = FIELDS.size + 16  # version 3: the fields, the head digest, then the CRC-32
DIM = 16


def reseal(data: bytes) -> bytes:
    """The file with its CRC-32 recomputed, as anyone crafting a file can: the checksum then passes."""
    crc = zlib.crc32(data[HEADER_SIZE:], zlib.crc32(data[:CRC_AT]))
    return data[:CRC_AT] + CRC.pack(crc) + data[CRC_AT + CRC.size :]


def with_fields(data: bytes, **changes) -> bytes:
    """Header fields (metric, dim, n, nnz) replaced."""
    magic, version, metric, dim, n, nnz = FIELDS.unpack_from(data)
    fields = {"metric": metric, "dim": dim, "n": n, "nnz": nnz} | changes
    return FIELDS.pack(magic, version, fields["metric"], fields["dim"], fields["n"], fields["nnz"]) + data[FIELDS.size :]


def arrays(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Writable copies of (offsets, ids, values) of a file's bytes, as the file lays them out, unchecked."""
    _, _, _, dim, _, nnz = FIELDS.unpack_from(data)
    offsets_at, ids_at, values_at, _ = index_module._layout(dim, nnz)
    raw = np.frombuffer(data, dtype=np.uint8)
    return (raw[offsets_at : offsets_at + 8 * (dim + 1)].view("<i8").copy(), raw[ids_at : ids_at + 3 * nnz].reshape(nnz, 3).copy(),
            raw[values_at : values_at + 2 * nnz].view("<f2").copy())


def with_arrays(data: bytes, offsets=None, ids=None, values=None) -> bytes:
    """The file with some arrays overwritten in place (same sizes)."""
    _, _, _, dim, _, nnz = FIELDS.unpack_from(data)
    out = bytearray(data)
    for start, a in zip(index_module._layout(dim, nnz)[:3], (offsets, ids, values), strict=True):
        if a is not None:
            b = np.ascontiguousarray(a).view(np.uint8).reshape(-1).tobytes()
            out[start : start + len(b)] = b
    return bytes(out)


def edit(data: bytes, name: str, change) -> bytes:
    """The file with one array changed by change(copy) (in place), the checksum resealed."""
    a = dict(zip(("offsets", "ids", "values"), arrays(data), strict=True))[name]
    change(a)
    return reseal(with_arrays(data, **{name: a}))


def set_value(value: float):
    def change(values):
        values[3] = value
    return change


@pytest.fixture()
def good(tmp_path) -> bytes:
    """The bytes of a saved index of 40 codes over DIM latents, k = 2."""
    InvertedIndex.build(random_codes(40, DIM, 2, seed=1, zero_frac=0.0)).save(tmp_path / "good.idx")
    return (tmp_path / "good.idx").read_bytes()


def decreasing(offsets):
    offsets[5] = offsets[6] + 1


def past_the_end(offsets):
    offsets[5:-1] = offsets[-1] + 100  # list 4 runs beyond nnz, the last one runs backwards


def last_past_nnz(offsets):
    offsets[-1] += 3


def big_id(ids):
    ids[2] = pack_ids(np.array([2**24 - 1]))[0]


CRAFTED = {
    # the arrays (checked by the structure pass)
    "n too small for the stored ids": (lambda b: reseal(with_fields(b, n=5)), "stored id \\d+ is >= its n = 5"),
    "an id 2^24 - 1": (lambda b: edit(b, "ids", big_id), "stored id 16777215 is >= its n = 40"),
    "decreasing offsets": (lambda b: edit(b, "offsets", decreasing), "offsets decrease"),
    "offsets past the end": (lambda b: edit(b, "offsets", past_the_end), "offsets decrease"),
    "last offset past nnz": (lambda b: edit(b, "offsets", last_past_nnz), "offsets do not run from 0 to nnz"),
    "a negative value": (lambda b: edit(b, "values", set_value(-0.5)), "zero, negative, NaN or Inf"),
    "a NaN value": (lambda b: edit(b, "values", set_value(np.nan)), "zero, negative, NaN or Inf"),
    "an Inf value": (lambda b: edit(b, "values", set_value(np.inf)), "zero, negative, NaN or Inf"),
    "a zero value": (lambda b: edit(b, "values", set_value(0.0)), "zero, negative, NaN or Inf"),
    # the header alone
    "n above the 2^24 cap": (lambda b: reseal(with_fields(b, n=MAX_VECTORS + 1)), "more than the 16777216"),
    "n = 5e9": (lambda b: reseal(with_fields(b, n=5_000_000_000)), "5000000000 vectors, more than"),
    "nnz above n dim": (lambda b: reseal(with_fields(b, n=2)), "stored values for 2 vectors of dim 16"),
    "nnz beyond the file": (lambda b: reseal(with_fields(b, nnz=FIELDS.unpack_from(b)[5] + 1)), "truncated or damaged"),
    "an unknown metric": (lambda b: reseal(with_fields(b, metric=7)), "unknown metric code 7"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_files_with_a_valid_checksum_raise_one_line(good, tmp_path, case):
    craft, message = CRAFTED[case]
    path = tmp_path / "crafted.idx"
    path.write_bytes(craft(good))
    for mmap in (True, False):
        for verify in (True, False):  # verify=False skips the checksum, never the structure
            with pytest.raises(InputError, match=message) as e:
                InvertedIndex.open(path, mmap=mmap, verify=verify)
            assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ")


ALL_LATENTS = SparseCodes(np.arange(DIM, dtype=np.int32)[None], np.ones((1, DIM), np.float32), DIM)  # touches every list


@pytest.mark.skipif(True not in SEARCH_PATHS, reason="the compiled kernel needs numba")
@pytest.mark.parametrize("case, n", [("n too small for the stored ids", 5), ("an id 2^24 - 1", 40), ("decreasing offsets", 40),
                                     ("offsets past the end", 40)])
def test_the_kernel_stays_in_bounds_whatever_the_arrays_hold(good, case, n):
    """Arrays never checked by `open` (an index made from them directly): the compiled search stops with one line
    before it reads or writes outside them."""
    index = InvertedIndex(*arrays(CRAFTED[case][0](good)), n=n, metric="ip")
    with pytest.raises(InputError, match="the index's arrays are inconsistent") as e:
        index.search(ALL_LATENTS, 10, compiled=True)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(True not in SEARCH_PATHS, reason="the compiled kernel needs numba")
def test_the_kernel_refuses_a_list_whose_ids_go_back_across_blocks():
    """The kernel sums BLOCK vectors at a time, reading each list in id order: an id below the block it reached is refused."""
    n = index_module.BLOCK + 10
    offsets = np.array([0, 2, 2], dtype=np.int64)
    ids = pack_ids(np.array([index_module.BLOCK + 1, 0]))
    index = InvertedIndex(offsets, ids, np.ones(2, np.float16), n=n, metric="ip")
    with pytest.raises(InputError, match="not ascending"):
        index.search(SparseCodes(np.array([[0]], np.int32), np.ones((1, 1), np.float32), 2), 5, compiled=True)


def test_the_cli_refuses_a_crafted_file_in_one_line(tmp_path, make_head):
    head = make_head(input_dim=8, hidden_dim=DIM, k=2)
    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    save_head(head, tmp_path / "model")
    np.save(tmp_path / "q.npy", x)
    InvertedIndex.build(encode(head, x), "cosine", head_digest=head.digest()).save(tmp_path / "i.idx")
    (tmp_path / "i.idx").write_bytes(CRAFTED["n too small for the stored ids"][0]((tmp_path / "i.idx").read_bytes()))
    src = str(Path(csrv2.__file__).parent.parent)  # run the csrv2 under test
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "csrv2", "search", "--index", str(tmp_path / "i.idx"), "--queries", str(tmp_path / "q.npy"),
                          "--model", str(tmp_path / "model")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("csrv2: error: ") and run.stderr.count("\n") == 1 and "corrupted" in run.stderr, run.stderr


def test_a_reader_racing_a_writer_sees_one_index_or_the_other(tmp_path):
    """A thread saves two different indexes alternately at one path (each save is a rename over it) while the
    test opens and searches that path: every answer is the old index's or the new one's, on every search path."""
    path = tmp_path / "race.idx"
    old = InvertedIndex.build(random_codes(300, 64, 4, seed=2))
    new = InvertedIndex.build(random_codes(450, 64, 4, seed=3), "cosine")  # another size, metric and layout
    queries = random_codes(8, 64, 4, seed=4)
    expected = {c: [index.search(queries, 5, compiled=c) for index in (old, new)] for c in SEARCH_PATHS}
    assert not np.array_equal(expected[False][0][0], expected[False][1][0])
    old.save(path)
    for compiled in SEARCH_PATHS:  # compile the kernel for read-only arrays before the race, not during it
        InvertedIndex.open(path).search(queries, 5, compiled=compiled)
    saves, stop, errors = [0], threading.Event(), []

    def writer():
        try:
            while not stop.is_set():
                (new if saves[0] % 2 == 0 else old).save(path)
                saves[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    reads, seen, deadline = 0, set(), time.monotonic() + 60
    try:
        while (saves[0] < 200 or reads < 50) and not errors and time.monotonic() < deadline:
            index = InvertedIndex.open(path, mmap=reads % 2 == 0, verify=reads % 3 != 2)
            for compiled in SEARCH_PATHS:
                ids, scores = index.search(queries, 5, compiled=compiled)
                which = [i for i, (want_ids, want_scores) in enumerate(expected[compiled])
                         if np.array_equal(ids, want_ids) and np.array_equal(scores, want_scores)]
                assert which, f"read {reads}: hits from neither index"
                seen.update(which)
            reads += 1
    finally:
        stop.set()
        thread.join()
    assert not errors and saves[0] >= 200 and reads >= 50 and seen == {0, 1}, (errors, saves, reads, seen)


def test_an_absurd_top_n_is_capped_at_the_index_size():
    codes = random_codes(40, DIM, 2, seed=5)
    index = InvertedIndex.build(codes)
    queries = random_codes(3, DIM, 2, seed=6)
    for compiled in SEARCH_PATHS:
        ids, scores = index.search(queries, 10**12, compiled=compiled)  # uncapped: 12 TB of results
        assert ids.shape == scores.shape == (3, 40)
        want_ids, want_scores = index.search(queries, 40, compiled=compiled)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)
        assert ((ids == -1) == np.isneginf(scores)).all() and (ids == -1).any()  # rows with fewer candidates stay padded


def test_check_head_refuses_another_head_and_accepts_its_own(tmp_path, make_head):
    head, other = make_head(input_dim=8, hidden_dim=DIM, k=2, seed=0), make_head(input_dim=8, hidden_dim=DIM, k=2, seed=1)
    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    InvertedIndex.build(encode(head, x), "cosine", head_digest=head.digest()).save(tmp_path / "i.idx")
    index = InvertedIndex.open(tmp_path / "i.idx")
    assert index.head_digest == head.digest()[:32] != other.digest()[:32]
    index.check_head(head)
    with pytest.raises(InputError, match="this index was built with another head \\(digest [0-9a-f]{32}, ") as e:
        index.check_head(other)  # same shapes, other weights: its codes would be silently wrong
    assert "\n" not in str(e.value) and "search it with the model that built it" in str(e.value)
    InvertedIndex.build(encode(head, x)).check_head(other)  # an index that does not know its head checks nothing
