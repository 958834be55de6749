"""`SparseCodes`, the currency after the head, and batched encoding of embeddings into it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from tqdm.auto import tqdm

from .config import check_k
from .errors import InputError
from .head import SparseHead


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

    def to_torch(self) -> torch.Tensor:
        """(n, dim) coalesced torch sparse COO tensor without explicit zeros."""
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
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, indices=self.indices, values=self.values, dim=np.int64(self.dim))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseCodes:
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(f["indices"], f["values"], int(f["dim"]))
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{path}: not a csrv2 codes file ({e}); write one with `csrv2 encode`") from e


def encode(
    head: SparseHead,
    embeddings: np.ndarray | torch.Tensor,
    k: int | None = None,
    *,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> SparseCodes:
    """Encode (n, input_dim) embeddings (an array, memory map or tensor) into k-sparse codes.

    Batched so memory stays bounded; shows a progress bar when there is more than one batch
    (`progress=None`) or when asked. Raises `InputError` on a wrong dimension or non-finite values.
    """
    k = head.config.k if k is None else k
    check_k(k, head.config.hidden_dim)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if embeddings.ndim != 2 or embeddings.shape[1] != head.config.input_dim:
        raise InputError(
            f"embeddings have shape {tuple(embeddings.shape)} but the model expects (n, {head.config.input_dim}); "
            "encode embeddings made by the backbone the model was trained on"
        )
    device = torch.device(device) if device is not None else head.pre_bias.device
    head = head.to(device)
    n = embeddings.shape[0]
    starts = range(0, n, batch_size)
    show = len(starts) > 1 if progress is None else progress
    indices = np.empty((n, k), dtype=np.int32)
    values = np.empty((n, k), dtype=np.float32)
    for start in tqdm(starts, desc="encode", unit="batch", disable=not show):
        rows = embeddings[start : start + batch_size]
        batch = rows.float() if isinstance(rows, torch.Tensor) else torch.from_numpy(np.array(rows, dtype=np.float32))
        if not torch.isfinite(batch).all():
            bad = start + int((~torch.isfinite(batch).all(dim=1)).nonzero()[0])
            raise InputError(f"embeddings row {bad} has NaN or Inf values; drop or fix that row before encoding")
        idx, val = head.encode(batch.to(device), k)
        indices[start : start + len(batch)] = idx.cpu().numpy()
        values[start : start + len(batch)] = val.float().cpu().numpy()
    return SparseCodes(indices, values, head.config.hidden_dim)
