"""A sparse inverted index over `SparseCodes`: exact top-n search whose cost follows the posting lists a
query touches, not the number of indexed vectors.

Layout, CSR over latents (one posting list per latent):
    offsets: (dim + 1,) int64   the postings of latent j are [offsets[j], offsets[j + 1])
    ids:     (nnz, 3) uint8     vector ids as 24-bit little-endian integers, ascending inside each list
    values:  (nnz,) float16     the vector's value on that latent (of the L2-normalised code for "cosine")
so each non-zero value costs 5 bytes (10 per vector at k = 2), plus 8 (dim + 1) bytes of offsets shared
by all vectors. Three-byte ids cap an index at 2^24 (16.7M) vectors: shard beyond that, or use Qdrant.

Search: a query with k non-zero latents gathers those k lists (m postings, about k * nnz / dim when
latents are evenly used), sums the contributions per vector (a merge of sorted lists, then np.add.reduceat) and keeps
the top n with a partition: O(m log m) per query, whatever len(index) is.

File (`save` / `open`): a 64-byte little-endian header
    magic b"CSRV2IDX", version u32, metric u32 (0 ip, 1 cosine), dim u64, n u64, nnz u64, crc32 u32
then offsets, ids and values, each starting at a 64-byte-aligned offset (zero padding between), so
`open` can memory-map them. The CRC-32 covers the header fields before it and everything after the header.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..atomic import write_file
from ..codes import SparseCodes
from ..errors import InputError

try:  # the compiled search kernel is optional: `pip install "csrv2[fast]"`; numpy serves without it
    import numba
except ImportError:
    numba = None

MAGIC = b"CSRV2IDX"
VERSION = 2  # 2: 3-byte ids (version 1 stored uint32 ids)
METRICS = ("ip", "cosine")
HEADER_SIZE = 64
FIELDS = struct.Struct("<8sIIQQQ")  # magic, version, metric, dim, n, nnz; the crc32 (<I) follows
CRC = struct.Struct("<I")
F16_MAX = float(np.finfo(np.float16).max)
ID_BYTES = 3
POSTING_BYTES = ID_BYTES + 2  # a 3-byte id and a float16 value per stored non-zero
MAX_VECTORS = 2 ** (8 * ID_BYTES)
CHUNK = 1 << 24  # bytes read at a time when verifying the checksum


def _layout(dim: int, nnz: int) -> tuple[int, int, int, int]:
    """Byte offsets of the offsets, ids and values arrays in a file (each a multiple of 64), and the file's size."""
    ids_at = -(-(HEADER_SIZE + 8 * (dim + 1)) // 64) * 64
    values_at = -(-(ids_at + ID_BYTES * nnz) // 64) * 64
    return HEADER_SIZE, ids_at, values_at, values_at + 2 * nnz


def pack_ids(ids: np.ndarray) -> np.ndarray:
    """(m,) ids in [0, 2^24) -> (m, 3) uint8, little-endian."""
    return np.ascontiguousarray(np.asarray(ids, dtype="<u4").view(np.uint8).reshape(-1, 4)[:, :ID_BYTES])


def unpack_ids(packed: np.ndarray) -> np.ndarray:
    """(m, 3) uint8 -> (m,) int64 ids."""
    p = np.asarray(packed, dtype=np.int64)
    return p[:, 0] | (p[:, 1] << 8) | (p[:, 2] << 16)


def check_codes(codes: SparseCodes, what: str) -> np.ndarray:
    """(n, k) bool mask of the used (non-zero) slots; `InputError` on values or latents that cannot be indexed."""
    bad = ~np.isfinite(codes.values) | (codes.values < 0)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise InputError(f"{what} row {row} has a negative, NaN or Inf value; codes must be finite and >= 0 (TopK/ReLU output)")
    used = codes.values != 0
    idx = codes.indices.astype(np.int64)
    out = used & ((idx < 0) | (idx >= codes.dim))
    if out.any():
        row = int(np.flatnonzero(out.any(axis=1))[0])
        raise InputError(f"{what} row {row} has a latent outside [0, {codes.dim}); check the codes' dim")
    # A latent used twice in one code would be counted twice; unused slots get distinct negative stand-ins.
    distinct = np.sort(np.where(used, idx, -1 - np.arange(codes.k)), axis=1)
    dup = (distinct[:, 1:] == distinct[:, :-1]).any(axis=1)
    if dup.any():
        raise InputError(f"{what} row {int(np.flatnonzero(dup)[0])} uses a latent twice; each latent may appear once per code")
    return used


def code_weights(codes: SparseCodes, metric: str) -> np.ndarray:
    """(n, k) float64 values, each row divided by its L2 norm for "cosine" (all-zero rows stay zero)."""
    v = codes.values.astype(np.float64)
    if metric == "cosine":
        norm = np.sqrt((v * v).sum(axis=1, keepdims=True))
        v = np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)
    return v


def _postings(codes: SparseCodes, metric: str, first_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays (offsets (dim+1,) int64, ids (nnz, 3) uint8, values (nnz,) float16) of `codes`, ids from `first_id`."""
    used = check_codes(codes, "codes")
    w = code_weights(codes, metric)
    if (w > F16_MAX).any():
        raise InputError(f"codes have values above {F16_MAX:g}, the float16 limit of the index; use metric='cosine' or scale the values down")
    w16 = w.astype(np.float16)
    rows, slots = np.nonzero(used & (w16 != 0))  # values below float16's smallest step round to 0: not indexed
    latents = codes.indices[rows, slots]
    order = np.argsort(latents, kind="stable")  # rows come ascending, so stable keeps ids sorted in each list
    offsets = np.zeros(codes.dim + 1, dtype=np.int64)
    np.cumsum(np.bincount(latents, minlength=codes.dim), out=offsets[1:])
    return offsets, pack_ids(rows[order] + first_id), w16[rows, slots][order]


def _top(cand: np.ndarray, score: np.ndarray, top_n: int) -> np.ndarray:
    """Positions of the top_n entries by score, descending, ties by smaller id; `cand` (m,) ascending ids."""
    keep = np.arange(len(score))
    if len(score) > top_n:
        kth = score[np.argpartition(score, len(score) - top_n)[len(score) - top_n]]  # the top_n-th largest score
        above = np.flatnonzero(score > kth)
        keep = np.concatenate([above, np.flatnonzero(score == kth)[: top_n - len(above)]])  # cand ascending: smallest ids win
    return keep[np.lexsort((cand[keep], -score[keep]))]


# float16 bit pattern -> float64 value: numba has no float16, so the kernel reads values as uint16.
_HALF = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float64)


def query_weights(queries: SparseCodes, dim: int, metric: str, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Checks shared by every search path; returns used (q, k) bool and the float32 query weights (q, k),
    L2-normalised for "cosine" and 0 in unused slots."""
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    if queries.dim != dim:
        raise InputError(f"queries have dim {queries.dim} but the index has dim {dim}; encode queries with the head that encoded the index")
    used = check_codes(queries, "queries")
    return used, np.where(used, code_weights(queries, metric), 0).astype(np.float32)


def _search_kernel(offsets, ids, bits, half, q_idx, q_val, scratch, out_ids, out_scores):
    """Compiled per-query scoring (numba), the same results as the numpy path of `InvertedIndex.search`.

    Scores accumulate in float64 in `scratch` (n,), zeros on entry and on exit, in query-latent order as
    the numpy path sums them; only the entries touched are read back and reset. The top-n is kept by insertion
    into the sorted rows of out_ids / out_scores (-1 / -inf on entry), ties to the smaller id.
    q_idx: (q, k) latents, q_val: (q, k) float32 weights, 0 for unused slots.
    """
    top_n = out_ids.shape[1]
    for r in range(q_idx.shape[0]):
        total = 0
        for a in range(q_idx.shape[1]):
            if q_val[r, a] > 0:
                total += offsets[q_idx[r, a] + 1] - offsets[q_idx[r, a]]
        touched = np.empty(total, np.int64)
        m = 0
        for a in range(q_idx.shape[1]):
            w = np.float64(q_val[r, a])
            if w <= 0:
                continue
            for p in range(offsets[q_idx[r, a]], offsets[q_idx[r, a] + 1]):
                d = np.int64(ids[p, 0]) | (np.int64(ids[p, 1]) << 8) | (np.int64(ids[p, 2]) << 16)
                if scratch[d] == 0.0:  # every contribution is > 0, so 0 means not seen yet
                    touched[m] = d
                    m += 1
                scratch[d] += half[bits[p]] * w
        kept = 0
        for t in range(m):
            d = touched[t]
            score = np.float32(scratch[d])
            scratch[d] = 0.0
            if kept < top_n:
                pos = kept
                kept += 1
            elif score > out_scores[r, top_n - 1] or (score == out_scores[r, top_n - 1] and d < out_ids[r, top_n - 1]):
                pos = top_n - 1
            else:
                continue
            while pos > 0 and (score > out_scores[r, pos - 1] or (score == out_scores[r, pos - 1] and d < out_ids[r, pos - 1])):
                out_scores[r, pos] = out_scores[r, pos - 1]
                out_ids[r, pos] = out_ids[r, pos - 1]
                pos -= 1
            out_scores[r, pos] = score
            out_ids[r, pos] = d


if numba is not None:
    _search_kernel = numba.njit(cache=True)(_search_kernel)


def _read(path: Path, dtype: str, offset: int, count: int, mmap: bool) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty maps
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
    return np.fromfile(path, dtype=dtype, count=count, offset=offset)


class InvertedIndex:
    """Posting lists of n sparse vectors over `dim` latents, searched exactly by inner product or cosine.

    offsets (dim + 1,) int64, ids (nnz, 3) uint8 (24-bit ids), values (nnz,) float16: see the module docstring.
    Build with `InvertedIndex.build(codes)`, read a saved one with `InvertedIndex.open(path)`.
    """

    def __init__(self, offsets: np.ndarray, ids: np.ndarray, values: np.ndarray, n: int, metric: str):
        self.offsets, self.ids, self.values, self.n, self.metric = offsets, ids, values, n, metric
        self._scratch: np.ndarray | None = None  # (n,) float64 accumulator of the compiled search; not thread-safe

    @classmethod
    def build(cls, codes: SparseCodes, metric: str = "ip") -> InvertedIndex:
        """Index (n, k) codes as vectors 0 .. n-1. "cosine" stores each code divided by its L2 norm.

        Explicit zeros are not indexed. `InputError` on negative, NaN or Inf values, latents outside
        [0, dim), a latent used twice in a code, or (metric "ip") values beyond float16's 65504.
        """
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if len(codes) > MAX_VECTORS:
            raise InputError(f"{len(codes)} codes exceed the index's {MAX_VECTORS} 3-byte ids; split them across indexes")
        return cls(*_postings(codes, metric, 0), n=len(codes), metric=metric)

    def add(self, codes: SparseCodes) -> None:
        """Append (m, k) codes as vectors len(self) .. len(self)+m-1.

        Rebuilds the three arrays, O(nnz of the whole index) per call (in memory, even for an opened
        file): add in large batches, not one vector at a time. Raises like `build`, before changing anything.
        """
        if codes.dim != self.dim:
            raise InputError(f"codes have dim {codes.dim} but the index has dim {self.dim}; add codes from the same head")
        if len(self) + len(codes) > MAX_VECTORS:
            raise InputError(f"{len(self) + len(codes)} vectors exceed the index's {MAX_VECTORS} 3-byte ids; start another index")
        off_b, ids_b, values_b = _postings(codes, self.metric, len(self))
        # New ids all exceed the old ones, so merged list j is old list j followed by new list j: old
        # posting p of latent j moves to p + off_b[j], new posting q of latent j to q + off_a[j + 1].
        off_a, nnz_a = self.offsets, len(self.ids)
        lat_a = np.repeat(np.arange(self.dim), np.diff(off_a))
        lat_b = np.repeat(np.arange(self.dim), np.diff(off_b))
        pos_a = np.arange(nnz_a) + off_b[lat_a]
        pos_b = np.arange(len(ids_b)) + off_a[lat_b + 1]
        ids = np.empty((nnz_a + len(ids_b), ID_BYTES), dtype=np.uint8)
        values = np.empty(nnz_a + len(ids_b), dtype=np.float16)
        ids[pos_a], ids[pos_b] = self.ids, ids_b
        values[pos_a], values[pos_b] = self.values, values_b
        self.offsets, self.ids, self.values, self.n = off_a + off_b, ids, values, len(self) + len(codes)

    def __len__(self) -> int:
        return self.n

    @property
    def dim(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        """Bytes held by the three arrays (a saved file adds a 64-byte header and at most 126 bytes of padding)."""
        return self.offsets.nbytes + self.ids.nbytes + self.values.nbytes

    def bytes_per_vector(self) -> float:
        """`nbytes / len(self)`, offsets included: 5 per non-zero value + 8 (dim + 1) / n; NaN when empty."""
        return self.nbytes / len(self) if len(self) else float("nan")

    def __repr__(self) -> str:
        return f"InvertedIndex(n={len(self)}, dim={self.dim}, nnz={len(self.ids)}, metric={self.metric!r})"

    def search(self, queries: SparseCodes, top_n: int, compiled: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-n: ids (q, top_n) int64 and scores (q, top_n) float32 for (q, k) queries.

        score = sum over shared latents of stored value (float16) x query value (float32; L2-normalised
        first for "cosine"); each product is exact in float64 and the sum is rounded once to float32.
        Rows are sorted by score, descending, ties by smaller id. Only vectors sharing a non-zero latent
        with the query are candidates (the others score 0): when fewer than top_n exist, the row is
        padded with id -1 and score -inf. Cost per query follows the postings of its latents.
        `InputError` on a dim other than the index's or values `build` refuses; `ValueError` if top_n < 1.
        compiled: the numba kernel (default when numba is installed) or the numpy path; same results.
        """
        used, weights = query_weights(queries, self.dim, self.metric, top_n)
        ids = np.full((len(queries), top_n), -1, dtype=np.int64)
        scores = np.full((len(queries), top_n), -np.inf, dtype=np.float32)
        if compiled is None:
            compiled = numba is not None
        if compiled:
            if numba is None:
                raise ImportError('the compiled search needs numba: pip install "csrv2[fast]"')
            if self._scratch is None or len(self._scratch) != len(self):
                self._scratch = np.zeros(len(self))  # kept between calls: a fresh one costs page faults per query
            _search_kernel(np.asarray(self.offsets), np.asarray(self.ids), np.asarray(self.values).view(np.uint16), _HALF,
                           queries.indices.astype(np.int64), weights, self._scratch, ids, scores)
            return ids, scores
        for r in range(len(queries)):
            latents = queries.indices[r][used[r]]
            starts, ends = self.offsets[latents], self.offsets[latents + 1]
            if latents.size == 0 or (ends == starts).all():
                continue
            doc = np.concatenate([unpack_ids(self.ids[s:e]) for s, e in zip(starts, ends)])
            val = np.concatenate([self.values[s:e] for s, e in zip(starts, ends)]).astype(np.float64)
            contrib = val * np.repeat(weights[r][used[r]].astype(np.float64), ends - starts)
            # Each list is sorted by id, so a stable sort merges k sorted runs (timsort: several
            # times faster here than np.unique's sort); equal ids then sit together and are summed.
            order = np.argsort(doc, kind="stable")
            doc, contrib = doc[order], contrib[order]
            starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
            cand = doc[starts]  # (m,) ascending candidate ids
            score = np.add.reduceat(contrib, starts).astype(np.float32)
            top = _top(cand, score, top_n)
            ids[r, : len(top)], scores[r, : len(top)] = cand[top], score[top]
        return ids, scores

    def save(self, path: str | os.PathLike) -> None:
        """Write one file atomically: a temporary file beside `path`, then a rename over it.

        An interrupted save leaves any previous file intact and removes the temporary file. Replacing a
        file that an open index maps is safe on POSIX: the mapping keeps the old contents.
        """
        path = Path(path)
        arrays = [np.ascontiguousarray(a, dtype=t).reshape(-1) for a, t in ((self.offsets, "<i8"), (self.ids, "u1"), (self.values, "<f2"))]
        fields = FIELDS.pack(MAGIC, VERSION, METRICS.index(self.metric), self.dim, len(self), len(self.ids))
        pieces, at = [], HEADER_SIZE  # the payload: each array preceded by zero padding up to its aligned start
        for start, a in zip(_layout(self.dim, len(self.ids)), arrays):
            pieces += [bytes(start - at), a.view(np.uint8)]
            at = start + a.nbytes
        crc = zlib.crc32(fields)
        for piece in pieces:
            crc = zlib.crc32(piece, crc)

        def write(f) -> None:
            f.write(fields + CRC.pack(crc) + bytes(HEADER_SIZE - FIELDS.size - CRC.size))
            for piece in pieces:
                f.write(piece)

        write_file(path, write)

    @classmethod
    def open(cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> InvertedIndex:
        """Read a file written by `save`; with mmap=True the arrays are read-only np.memmap views.

        Checks the magic bytes, the format version and the file size, then (verify=True) the CRC-32,
        which streams the whole file once in 16 MiB chunks: pass verify=False to skip it on huge files
        you trust. Each failure is an `InputError` naming the problem and the fix.
        """
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(HEADER_SIZE)
        except OSError as e:
            raise InputError(f"{path}: cannot be read ({e.strerror}); pass a file written by InvertedIndex.save") from e
        if head[:8] != MAGIC:
            raise InputError(f"{path}: not a csrv2 index file (bad magic bytes); pass a file written by InvertedIndex.save")
        if len(head) < HEADER_SIZE:
            raise InputError(f"{path}: truncated ({size} bytes, shorter than the {HEADER_SIZE}-byte header); save the index again")
        _, version, metric, dim, n, nnz = FIELDS.unpack_from(head)
        if version != VERSION:
            raise InputError(f"{path}: written by index format version {version}, this csrv2 reads version {VERSION}; rebuild the index from its codes")
        offsets_at, ids_at, values_at, expected = _layout(dim, nnz)
        if size != expected:
            raise InputError(f"{path}: truncated or damaged ({size} bytes, its header implies {expected}); save the index again")
        if verify:
            crc = zlib.crc32(head[: FIELDS.size])
            with open(path, "rb") as f:
                f.seek(HEADER_SIZE)
                while chunk := f.read(CHUNK):
                    crc = zlib.crc32(chunk, crc)
            if crc != CRC.unpack_from(head, FIELDS.size)[0]:
                raise InputError(f"{path}: corrupted (checksum mismatch); save the index again from its codes")
        offsets = _read(path, "<i8", offsets_at, dim + 1, mmap)
        if metric >= len(METRICS) or offsets[0] != 0 or offsets[-1] != nnz:
            raise InputError(f"{path}: corrupted (inconsistent header or offsets); save the index again from its codes")
        ids, values = _read(path, "u1", ids_at, ID_BYTES * nnz, mmap).reshape(nnz, ID_BYTES), _read(path, "<f2", values_at, nnz, mmap)
        return cls(offsets, ids, values, n=n, metric=METRICS[metric])
