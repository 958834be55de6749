"""`SparseCodes`, the currency after the head: n k-sparse codes as two numpy arrays (no torch needed to hold or search them)."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from .atomic import write_file
from .errors import InputError


@dataclass(frozen=True)
class SparseCodes:
    """n k-sparse codes over `dim` latents.

    indices: (n, k) int32, values: (n, k) float32, row-aligned, largest value first. A value of 0
    (ReLU of a negative pre-activation) marks an unused slot; converters drop those.
    """

    indices: np.ndarray
    values: np.ndarray
    dim: int

    def __post_init__(self) -> None:
        if self.indices.shape != self.values.shape or self.indices.ndim != 2:
            raise ValueError(f"indices {self.indices.shape} and values {self.values.shape} must both be (n, k)")

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def __len__(self) -> int:
        return self.indices.shape[0]

    def nnz_per_row(self) -> np.ndarray:
        """(n,) number of non-zero values in each code."""
        return (self.values != 0).sum(axis=1)

    def to_scipy(self) -> scipy.sparse.csr_matrix:
        """(n, dim) scipy CSR matrix without explicit zeros."""
        n, k = self.indices.shape
        rows = np.repeat(np.arange(n), k)
        m = scipy.sparse.csr_matrix(
            (self.values.ravel(), (rows, self.indices.ravel())), shape=(n, self.dim), dtype=np.float32
        )
        m.eliminate_zeros()
        return m

    def to_torch(self):
        """(n, dim) coalesced torch sparse COO tensor without explicit zeros."""
        import torch

        keep = self.values.ravel() != 0
        rows = np.repeat(np.arange(len(self)), self.k)[keep]
        idx = torch.from_numpy(np.stack([rows, self.indices.ravel()[keep].astype(np.int64)]))
        vals = torch.from_numpy(np.ascontiguousarray(self.values.ravel()[keep]))
        return torch.sparse_coo_tensor(idx, vals, (len(self), self.dim), check_invariants=False).coalesce()

    def to_dense(self) -> np.ndarray:
        """(n, dim) float32 zero-filled array; for small n only."""
        out = np.zeros((len(self), self.dim), dtype=np.float32)
        np.put_along_axis(out, self.indices.astype(np.int64), self.values, axis=1)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz with `indices` (n, k), `values` (n, k) and `dim`, atomically."""
        write_file(path, lambda f: np.savez(f, indices=self.indices, values=self.values, dim=np.int64(self.dim)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseCodes:
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(f["indices"], f["values"], int(f["dim"]))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"{path}: not a csrv2 codes file ({e}); write one with `csrv2 encode`") from e
