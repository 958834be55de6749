"""The inverted index on a torch device (a GPU, or the CPU): one sparse-dense product per query batch.

The posting lists of an `InvertedIndex` are its vectors' non-zeros grouped by latent, i.e. the
(n, dim) code matrix in compressed-sparse-column form; here they become an (n, dim) sparse CSR
tensor X. A batch of q queries is zero-filled into Q: (dim, q), and the scores X Q: (n, q) come
from one sparse-dense product (cuSPARSE SpMM on a GPU), whose work is the postings the queries touch
(each stored non-zero meets the q query columns) plus writing the (n, q) scores; then the top-n of
each column. The scores matrix grows with n: `search` cuts the queries into batches to bound it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .codes import SparseCodes
from .errors import InputError
from .index import InvertedIndex, check_codes, code_weights


class TorchIndex:
    """An `InvertedIndex` held on `device` as an (n, dim) sparse CSR tensor of float32 values.

    Same scores as `InvertedIndex.search` up to float32 summation order; tied scores may come in
    any order (torch.topk does not break ties by id).
    """

    def __init__(self, index: InvertedIndex, device: torch.device | str) -> None:
        self.device, self.metric, self.dim, self.n = torch.device(device), index.metric, index.dim, len(index)
        counts = np.diff(np.asarray(index.offsets))
        latents = np.repeat(np.arange(index.dim), counts)  # (nnz,) each posting's latent
        ids = np.asarray(index.ids).astype(np.int64)
        order = np.lexsort((latents, ids))  # row-major: by vector id, then latent
        coo = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([ids[order], latents[order]])),
            torch.from_numpy(np.asarray(index.values)[order].astype(np.float32)),
            (self.n, self.dim),
            check_invariants=False,
        )
        with warnings.catch_warnings():  # torch calls its sparse CSR support beta; CSR SpMM is what we need
            warnings.simplefilter("ignore", UserWarning)
            self.matrix = coo.coalesce().to_sparse_csr().to(self.device)  # (n, dim)

    def search(self, queries: SparseCodes, top_n: int, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Top-n ids (q, top_n) int64 and scores (q, top_n) float32, padded with -1 / -inf like `InvertedIndex.search`."""
        ids, scores = self.search_tensors(queries, top_n, batch_size)
        return ids.cpu().numpy(), scores.cpu().numpy()

    def search_tensors(self, queries: SparseCodes, top_n: int, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """As `search`, with the results left on the device (no copy back, no host synchronisation)."""
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        if queries.dim != self.dim:
            raise InputError(f"queries have dim {queries.dim} but the index has dim {self.dim}; encode queries with the head that encoded the index")
        used = check_codes(queries, "queries")
        weights = np.where(used, code_weights(queries, self.metric), 0).astype(np.float32)
        idx = torch.from_numpy(queries.indices.astype(np.int64)).to(self.device)
        val = torch.from_numpy(weights).to(self.device)
        n_top = min(top_n, self.n)
        out_ids, out_scores = [], []
        for start in range(0, len(queries), batch_size):
            i, v = idx[start : start + batch_size], val[start : start + batch_size]
            q = torch.zeros(len(i), self.dim, device=self.device).scatter_(1, i, v)  # (b, dim) zero-filled queries
            scores = (self.matrix @ q.T).T  # (b, n)
            top = scores.topk(n_top, dim=1)
            found = top.values > 0  # vectors that share no latent with the query score 0: not candidates
            out_ids.append(torch.where(found, top.indices, -1))
            out_scores.append(torch.where(found, top.values, -torch.inf))
        ids = torch.cat(out_ids) if out_ids else torch.empty(0, n_top, dtype=torch.long, device=self.device)
        scores = torch.cat(out_scores) if out_scores else torch.empty(0, n_top, device=self.device)
        if n_top < top_n:  # fewer vectors than top_n: pad as the numpy path does
            ids = torch.nn.functional.pad(ids, (0, top_n - n_top), value=-1)
            scores = torch.nn.functional.pad(scores, (0, top_n - n_top), value=-torch.inf)
        return ids, scores
