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

Asymmetric search: nothing ties a query's k to the documents'. Documents are stored at a small k (their
bytes); a query may be coded at a larger k (more lists touched, better recall of the documents' latents),
or be dense: `head.project(x)` weighs every latent, so the score is the query against each document's
decoded code, exact, at the cost of reading every list. The query side costs no storage.

File (`save` / `open`): a 64-byte little-endian header
    magic b"CSRV2IDX", version u32 (3), metric u32 (0 ip, 1 cosine), dim u64, n u64, nnz u64,
    head digest 16 bytes (the first half of `SparseHead.digest()`; zeros when unknown), crc32 u32
then offsets, ids and values, each starting at a 64-byte-aligned offset (zero padding between), so
`open` can memory-map them. The CRC-32 covers the header bytes before it and everything after the header.
Version 2 files (no head digest: the CRC follows nnz) are still read; their head is unknown.

A CRC-32 catches accidents, not a crafted file (anyone can recompute it), so `open` also checks the
structure the search relies on (monotone offsets, ids < n <= 2^24, finite positive values), and the
compiled kernel checks every list bound and id it uses, whatever the arrays hold. `open` reads the
header, the checksum and the arrays through one open file, so a reader racing a `save` to the same path
sees the old index or the new one, never a mix.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import write_file
from ..codes import SparseCodes
from ..errors import InputError

if TYPE_CHECKING:
    from ..head import SparseHead

try:  # the compiled search kernel is optional: `pip install "csrv2[fast]"`; numpy serves without it
    import numba
except ImportError:
    numba = None

MAGIC = b"CSRV2IDX"
VERSION = 3  # 3: the head's digest in the header; 2: 3-byte ids (version 1 stored uint32 ids)
READS = (2, 3)  # the versions `open` reads
METRICS = ("ip", "cosine")
HEADER_SIZE = 64
FIELDS = struct.Struct("<8sIIQQQ")  # magic, version, metric, dim, n, nnz; then (version 3) the head digest, then the crc32
DIGEST_BYTES = 16
CRC = struct.Struct("<I")
F16_MAX = float(np.finfo(np.float16).max)
ID_BYTES = 3
POSTING_BYTES = ID_BYTES + 2  # a 3-byte id and a float16 value per stored non-zero
MAX_VECTORS = 2 ** (8 * ID_BYTES)
CHUNK = 1 << 24  # bytes (or array entries) read at a time when verifying the checksum and the structure
# Kernel return codes: what made it stop before touching memory outside the arrays.
KERNEL_ERRORS = {1: "a query latent outside [0, dim)", 2: "a posting list outside [0, nnz) or with decreasing offsets",
                 3: "a stored id >= the index's n", 4: "a posting list whose ids are not ascending"}
BLOCK = 1 << 15  # vectors summed at a time by the compiled search: 256 KiB of float64 scores, which stay in cache


def _layout(dim: int, nnz: int) -> tuple[int, int, int, int]:
    """Byte offsets of the offsets, ids and values arrays in a file (each a multiple of 64), and the file's size."""
    ids_at = -(-(HEADER_SIZE + 8 * (dim + 1)) // 64) * 64
    values_at = -(-(ids_at + ID_BYTES * nnz) // 64) * 64
    return HEADER_SIZE, ids_at, values_at, values_at + 2 * nnz


def _crc_at(version: int) -> int:
    """Byte offset of the CRC-32 in a header of this version: after the fields, and the head digest from version 3."""
    return FIELDS.size + (DIGEST_BYTES if version >= 3 else 0)


def short_digest(digest: str | None) -> str | None:
    """A head digest (hex, as `SparseHead.digest()`) -> its first 16 bytes as 32 hex digits, what an index keeps."""
    if digest is None:
        return None
    try:
        if len(digest) < 2 * DIGEST_BYTES:
            raise ValueError
        return bytes.fromhex(digest[: 2 * DIGEST_BYTES]).hex()
    except (TypeError, ValueError):
        raise ValueError(f"head_digest must be a hex digest (SparseHead.digest()) of {2 * DIGEST_BYTES}+ digits, got {digest!r}") from None


def check_structure(offsets: np.ndarray, ids: np.ndarray, values: np.ndarray, n: int) -> str | None:
    """What breaks the index's invariants, or None: offsets (dim+1,) from 0 to nnz and never decreasing,
    ids (nnz, 3) all < n, values (nnz,) float16 finite and > 0 (`build` stores no zeros).

    One pass in chunks of CHUNK entries, so a memory-mapped file is checked in bounded memory.
    """
    nnz = len(ids)
    if len(values) != nnz or ids.ndim != 2 or ids.shape[1] != ID_BYTES:
        return f"its ids are not ({len(values)}, {ID_BYTES}) like its values"
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != nnz:
        return "its offsets do not run from 0 to nnz"
    for start in range(0, len(offsets) - 1, CHUNK):
        if (np.diff(offsets[start : start + CHUNK + 1]) < 0).any():
            return "its posting offsets decrease"
    for start in range(0, nnz, CHUNK):
        top = int(unpack_ids(ids[start : start + CHUNK]).max())
        if top >= n:
            return f"a stored id {top} is >= its n = {n}"
        bits = np.asarray(values[start : start + CHUNK]).view(np.uint16)
        if ((bits == 0) | (bits >= 0x7C00)).any():  # 0, or Inf/NaN (0x7C00..0x7FFF), or the sign bit: not finite and > 0
            return "a stored value is zero, negative, NaN or Inf"
    return None


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
        raise InputError(f"codes have values above {F16_MAX:g}, the float16 limit of the index; "
                         "use metric='cosine' or scale the values down")
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


def query_weights(queries: SparseCodes | np.ndarray, dim: int, metric: str, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Checks shared by every search path; returns the queries' latents (q, m) int64 and float32 weights (q, m),
    L2-normalised per row for "cosine" and 0 where a slot is unused.

    queries: (q, k) `SparseCodes` (m = k; weights >= 0), or dense (q, dim) float rows, e.g. `head.project`'s,
    whose every latent is a slot (m = dim, a read-only view; weights of any sign).
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    if isinstance(queries, SparseCodes):
        if queries.dim != dim:
            raise InputError(f"queries have dim {queries.dim} but the index has dim {dim}; "
                             "encode queries with the head that encoded the index")
        used = check_codes(queries, "queries")
        return queries.indices.astype(np.int64), np.where(used, code_weights(queries, metric), 0).astype(np.float32)
    rows = np.asarray(queries)
    if rows.ndim != 2 or rows.shape[1] != dim or not np.issubdtype(rows.dtype, np.floating):
        raise InputError(f"dense queries must be (q, {dim}) float rows (the head's projection, head.project), "
                         f"got {rows.dtype} {rows.shape}; project the queries with the head that encoded the index")
    weights = rows.astype(np.float64)
    if not np.isfinite(weights).all():
        raise InputError(f"dense query row {int(np.flatnonzero(~np.isfinite(weights).all(axis=1))[0])} is not finite; pass finite rows")
    if metric == "cosine":
        norm = np.sqrt((weights * weights).sum(axis=1, keepdims=True))
        weights = np.divide(weights, norm, out=np.zeros_like(weights), where=norm > 0)
    return np.broadcast_to(np.arange(dim, dtype=np.int64), rows.shape), weights.astype(np.float32)


def export_rows(codes: SparseCodes, metric: str, batch_size: int, ids: Sequence | None, payloads: Sequence | None,
                id_of: Callable = int) -> tuple[list, np.ndarray]:
    """Checks shared by every engine's `export_codes`, made before it touches a collection; returns the n point ids
    (`id_of` of each given id, default 0 .. n-1) and the (n, k) float64 stored weights, L2-normalised for "cosine" and
    0 in unused slots. `ValueError` on a metric or batch_size out of range; `InputError` on ids or payloads of a length
    other than n, a repeated id (an engine would keep both rows, or the last), or codes `build` refuses."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(codes)
    for name, given in (("ids", ids), ("payloads", payloads)):
        if given is not None and len(given) != n:
            raise InputError(f"{len(given)} {name} for {n} codes; pass one per code")
    ids = list(range(n)) if ids is None else [id_of(i) for i in ids]
    if len(set(ids)) != n:
        raise InputError(f"ids repeat ({n - len(set(ids))} duplicates among {n}); pass one distinct id per code")
    return ids, np.where(check_codes(codes, "codes"), code_weights(codes, metric), 0)


def _search_kernel(offsets, ids, bits, half, q_idx, q_val, n, out_ids, out_scores):
    """Compiled per-query scoring (numba), the same results as the numpy path of `InvertedIndex.search`.

    The n ids are cut into blocks of BLOCK vectors, and a block's postings are summed into a scratch of
    BLOCK float64 (with `seen` marks, since a sum of signed weights can be 0) that stays in cache: each list
    keeps a cursor and, its ids ascending, hands each block its run of postings below the block's end.
    One pass over the postings and no cache miss per posting, however many lists a query reads (a dense
    query reads them all). A vector's contributions are added in query-slot order, as the numpy path
    adds them. The top-n is kept by insertion into the sorted rows of out_ids / out_scores (-1 / -inf on
    entry), ties to the smaller id.
    q_idx: (q, m) latents, q_val: (q, m) float32 weights of any sign, 0 for unused slots.
    Returns 0, or a key of KERNEL_ERRORS as soon as a latent, list bound or id would reach outside the
    arrays (numba does not check bounds): nothing is read or written out of bounds whatever they hold.
    """
    top_n = out_ids.shape[1]
    dim, nnz = offsets.shape[0] - 1, min(ids.shape[0], bits.shape[0])
    if ids.shape[1] < 3:
        return 2
    width = min(BLOCK, max(n, 1))
    scratch = np.zeros(width)
    seen = np.zeros(width, np.bool_)
    touched = np.empty(width, np.int64)
    cursor = np.empty(q_idx.shape[1], np.int64)
    stop = np.empty(q_idx.shape[1], np.int64)
    for r in range(q_idx.shape[0]):
        for a in range(q_idx.shape[1]):
            cursor[a], stop[a] = 0, 0
            if q_val[r, a] != 0:
                j = q_idx[r, a]
                if j < 0 or j >= dim:
                    return 1
                if offsets[j] < 0 or offsets[j + 1] < offsets[j] or offsets[j + 1] > nnz:
                    return 2
                cursor[a], stop[a] = offsets[j], offsets[j + 1]
        kept = 0
        for first in range(0, n, width):
            end = min(first + width, n)
            m = 0
            for a in range(q_idx.shape[1]):
                w = np.float64(q_val[r, a])
                p = cursor[a]
                while p < stop[a]:
                    d = np.int64(ids[p, 0]) | (np.int64(ids[p, 1]) << 8) | (np.int64(ids[p, 2]) << 16)
                    if d >= end:
                        break
                    if d < first:  # ids not ascending in the list: leave the scratch cleared, as the next block expects
                        for t in range(m):
                            scratch[touched[t]] = 0.0
                            seen[touched[t]] = False
                        return 4
                    local = d - first
                    if not seen[local]:
                        seen[local] = True
                        touched[m] = local
                        m += 1
                    scratch[local] += half[bits[p]] * w
                    p += 1
                cursor[a] = p
            for t in range(m):
                local = touched[t]
                d = first + local
                score = np.float32(scratch[local])
                scratch[local] = 0.0
                seen[local] = False
                if kept < top_n:
                    pos = kept
                    kept += 1
                elif top_n > 0 and (score > out_scores[r, top_n - 1] or (score == out_scores[r, top_n - 1] and d < out_ids[r, top_n - 1])):
                    pos = top_n - 1
                else:
                    continue
                while pos > 0 and (score > out_scores[r, pos - 1] or (score == out_scores[r, pos - 1] and d < out_ids[r, pos - 1])):
                    out_scores[r, pos] = out_scores[r, pos - 1]
                    out_ids[r, pos] = out_ids[r, pos - 1]
                    pos -= 1
                out_scores[r, pos] = score
                out_ids[r, pos] = d
        for a in range(q_idx.shape[1]):
            if cursor[a] < stop[a]:  # postings left past the last block: an id >= n
                return 3
    return 0


if numba is not None:
    _search_kernel = numba.njit(cache=True)(_search_kernel)


class InvertedIndex:
    """Posting lists of n sparse vectors over `dim` latents, searched exactly by inner product or cosine.

    offsets (dim + 1,) int64, ids (nnz, 3) uint8 (24-bit ids), values (nnz,) float16: see the module docstring.
    Build with `InvertedIndex.build(codes)`, read a saved one with `InvertedIndex.open(path)`.
    head_digest: 32 hex digits, the first half of `SparseHead.digest()` of the head whose codes are
    indexed, or None when unknown; `check_head` compares a head with it.
    """

    def __init__(self, offsets: np.ndarray, ids: np.ndarray, values: np.ndarray, n: int, metric: str, head_digest: str | None = None):
        self.offsets, self.ids, self.values, self.n, self.metric = offsets, ids, values, n, metric
        self.head_digest = short_digest(head_digest)

    @classmethod
    def build(cls, codes: SparseCodes, metric: str = "ip", head_digest: str | None = None) -> InvertedIndex:
        """Index (n, k) codes as vectors 0 .. n-1. "cosine" stores each code divided by its L2 norm.

        head_digest: `head.digest()` of the head that encoded the codes, kept (its first 16 bytes) in the
        index and its file so that `check_head` can refuse another head; None leaves it unknown.
        Explicit zeros are not indexed. `InputError` on negative, NaN or Inf values, latents outside
        [0, dim), a latent used twice in a code, or (metric "ip") values beyond float16's 65504.
        """
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if len(codes) > MAX_VECTORS:
            raise InputError(f"{len(codes)} codes exceed the index's {MAX_VECTORS} 3-byte ids; split them across indexes")
        return cls(*_postings(codes, metric, 0), n=len(codes), metric=metric, head_digest=head_digest)

    def check_head(self, head: SparseHead) -> None:
        """`InputError` when `head` is not the one whose codes were indexed (its codes would land on other
        latents and the hits would be silently wrong); nothing when it is, or when the index does not know its head."""
        if self.head_digest is None:
            return
        given = short_digest(head.digest())
        if given != self.head_digest:
            raise InputError(f"this index was built with another head (digest {self.head_digest}, this model's {given}); "
                             "search it with the model that built it")

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
        return (f"InvertedIndex(n={len(self)}, dim={self.dim}, nnz={len(self.ids)}, metric={self.metric!r}, "
                f"head_digest={self.head_digest!r})")

    def search(self, queries: SparseCodes | np.ndarray, top_n: int, compiled: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-n: ids (q, w) int64 and scores (q, w) float32 for q queries, w = min(top_n, len(self)).

        queries: (q, k) `SparseCodes` of any k (coded by the head that encoded the index, at the documents'
        k or more: asymmetric search), or dense (q, dim) float rows (`head.project`: the query against the
        documents' decoded codes). score = sum over the query's latents of stored value (float16) x query
        weight (float32; each query row L2-normalised first for "cosine"); each product is exact in float64
        and the sum is rounded once to float32. Rows are sorted by score, descending, ties by smaller id.
        Candidates are the vectors with a stored value on a latent the query weighs non-zero (others score 0
        and are left out): when fewer than w exist, the row is padded with id -1 and score -inf. Cost per
        query follows the postings of its latents: m latents touch m lists, so a dense query reads them all.
        No more than len(self) columns: a huge top_n costs no more memory than the index's size.
        `InputError` on a dim other than the index's or values `build` refuses; `ValueError` if top_n < 1.
        compiled: the numba kernel (default when numba is installed) or the numpy path; same results.
        """
        latents, weights = query_weights(queries, self.dim, self.metric, top_n)
        top_n = min(top_n, len(self))
        ids = np.full((len(weights), top_n), -1, dtype=np.int64)
        scores = np.full((len(weights), top_n), -np.inf, dtype=np.float32)
        if compiled is None:
            compiled = numba is not None
        if compiled:
            if numba is None:
                raise ImportError('the compiled search needs numba: pip install "csrv2[fast]"')
            error = _search_kernel(np.asarray(self.offsets), np.asarray(self.ids), np.asarray(self.values).view(np.uint16), _HALF,
                                   latents, weights, len(self), ids, scores)
            if error:
                raise InputError(f"the index's arrays are inconsistent ({KERNEL_ERRORS[error]}); "
                                 "rebuild it from its codes, or read its file with InvertedIndex.open, which checks them")
            return ids, scores
        for r in range(len(weights)):
            used = weights[r] != 0
            latents_r, weights_r = latents[r][used], weights[r][used]
            starts, ends = self.offsets[latents_r], self.offsets[latents_r + 1]
            if latents_r.size == 0 or (ends == starts).all():
                continue
            doc = np.concatenate([unpack_ids(self.ids[s:e]) for s, e in zip(starts, ends, strict=True)])
            val = np.concatenate([self.values[s:e] for s, e in zip(starts, ends, strict=True)]).astype(np.float64)
            contrib = val * np.repeat(weights_r.astype(np.float64), ends - starts)
            # Each list is sorted by id, so a stable sort merges the sorted runs (timsort: several
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
        digest = bytes.fromhex(self.head_digest) if self.head_digest is not None else bytes(DIGEST_BYTES)
        fields = FIELDS.pack(MAGIC, VERSION, METRICS.index(self.metric), self.dim, len(self), len(self.ids)) + digest
        pieces, at = [], HEADER_SIZE  # the payload: each array preceded by zero padding up to its aligned start
        for start, a in zip(_layout(self.dim, len(self.ids))[:3], arrays, strict=True):
            pieces += [bytes(start - at), a.view(np.uint8)]
            at = start + a.nbytes
        crc = zlib.crc32(fields)
        for piece in pieces:
            crc = zlib.crc32(piece, crc)

        def write(f) -> None:
            f.write(fields + CRC.pack(crc) + bytes(HEADER_SIZE - len(fields) - CRC.size))
            for piece in pieces:
                f.write(piece)

        write_file(path, write)

    @classmethod
    def open(cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> InvertedIndex:
        """Read a file written by `save` (format version 2 or 3); with mmap=True the arrays are read-only
        np.memmap views of one mapping of the file, else they are read into memory.

        Checks the magic bytes, the format version, the header's counts and the file size, then
        (verify=True) the CRC-32, which streams the whole file once in 16 MiB chunks, then the structure
        (`check_structure`: one more pass over offsets, ids and values). verify=False skips the CRC only,
        for huge files you trust. Header, checksum and arrays all come through one open file, so a `save`
        to the same path meanwhile (a rename) cannot pair one version's header with another's arrays.
        Each failure is a one-line `InputError` naming the problem and the fix.
        """
        path = Path(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(HEADER_SIZE)
                version, metric, dim, n, nnz, digest = _check_header(path, head, size)
                raw = _whole(path, f, size, mmap)
        except OSError as e:
            raise InputError(f"{path}: cannot be read ({e.strerror}); pass a file written by InvertedIndex.save") from e
        crc_at = _crc_at(version)
        if verify:
            crc = zlib.crc32(raw[:crc_at])
            for start in range(HEADER_SIZE, size, CHUNK):
                crc = zlib.crc32(raw[start : start + CHUNK], crc)
            if crc != CRC.unpack_from(raw, crc_at)[0]:
                raise InputError(f"{path}: corrupted (checksum mismatch); save the index again from its codes")
        offsets_at, ids_at, values_at, _ = _layout(dim, nnz)
        offsets = raw[offsets_at : offsets_at + 8 * (dim + 1)].view("<i8")
        ids = raw[ids_at : ids_at + ID_BYTES * nnz].reshape(nnz, ID_BYTES)
        values = raw[values_at : values_at + 2 * nnz].view("<f2")
        if problem := check_structure(offsets, ids, values, n):
            raise InputError(f"{path}: corrupted ({problem}); save the index again from its codes")
        return cls(offsets, ids, values, n=n, metric=METRICS[metric], head_digest=digest)


def _whole(path: Path, f, size: int, mmap: bool) -> np.ndarray:
    """(size,) uint8: all of the open file `f`, one read-only np.memmap or read into memory, so that every array
    comes from the file this descriptor opened even if a `save` renames another over `path` meanwhile."""
    try:
        if mmap:
            raw = np.memmap(f, dtype=np.uint8, mode="r", shape=(size,))
        else:
            f.seek(0)
            raw = np.fromfile(f, dtype=np.uint8, count=size)
    except ValueError:  # np.memmap: the file is shorter than size by now
        raw = None
    if raw is None or len(raw) != size:  # only when the file itself is cut while being read, which save's rename never does
        raise InputError(f"{path}: changed while being read; open it again")
    return raw


def _check_header(path: Path, head: bytes, size: int) -> tuple[int, int, int, int, int, str | None]:
    """(version, metric, dim, n, nnz, head digest or None) of a file's first HEADER_SIZE bytes, after the checks
    that need no more of the file: magic, version, metric, n within the 3-byte ids, nnz <= n dim, and its size."""
    if head[:8] != MAGIC:
        raise InputError(f"{path}: not a csrv2 index file (bad magic bytes); pass a file written by InvertedIndex.save")
    if len(head) < HEADER_SIZE:
        raise InputError(f"{path}: truncated ({size} bytes, shorter than the {HEADER_SIZE}-byte header); save the index again")
    _, version, metric, dim, n, nnz = FIELDS.unpack_from(head)
    if version not in READS:
        raise InputError(f"{path}: written by index format version {version}, this csrv2 reads versions {READS[0]} to {READS[-1]}; "
                         "rebuild the index from its codes")
    if metric >= len(METRICS):
        raise InputError(f"{path}: corrupted (unknown metric code {metric}); save the index again from its codes")
    if n > MAX_VECTORS:
        raise InputError(f"{path}: corrupted (its header claims {n} vectors, more than the {MAX_VECTORS} its 3-byte ids can name); "
                         "save the index again from its codes")
    if nnz > n * dim:
        raise InputError(f"{path}: corrupted (its header claims {nnz} stored values for {n} vectors of dim {dim}); "
                         "save the index again from its codes")
    expected = _layout(dim, nnz)[3]
    if size != expected:
        raise InputError(f"{path}: truncated or damaged ({size} bytes, its header implies {expected}); save the index again")
    digest = head[FIELDS.size : FIELDS.size + DIGEST_BYTES] if version >= 3 else bytes(DIGEST_BYTES)
    return version, metric, dim, n, nnz, digest.hex() if any(digest) else None
