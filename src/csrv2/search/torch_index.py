"""The inverted index on a torch device (a GPU, or the CPU): sparse products, no dense score matrix.

The posting lists of an `InvertedIndex` (offsets, ids, values) are exactly the (dim, n) matrix X^T in
CSR form, so they move to the device as they are. A batch of q queries, a (q, dim) CSR matrix Q,
gives the scores Q X^T: (q, n) as a sparse-sparse product (cuSPARSE SpGEMM on a GPU) whose non-zeros
are just the candidates, the vectors sharing a latent with the query; each row's candidates are then
laid out in a (q, longest row) matrix padded with -inf for one topk. Nothing of size n per query is
built: a dense score matrix would cost more to select from (topk over mostly-zero rows is slow) than
to compute.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..codes import SparseCodes
from .index import InvertedIndex, query_weights, unpack_ids


class TorchIndex:
    """An `InvertedIndex` held on `device` as its (dim, n) CSR posting matrix, float32 values.

    Same scores as `InvertedIndex.search` up to float32 summation order; tied scores may come in
    any order (torch.topk does not break ties by id).
    """

    def __init__(self, index: InvertedIndex, device: torch.device | str) -> None:
        self.device, self.metric, self.dim, self.n = torch.device(device), index.metric, index.dim, len(index)
        with warnings.catch_warnings():  # torch calls its sparse CSR support beta; CSR products are what we need
            warnings.simplefilter("ignore", UserWarning)
            self.postings = torch.sparse_csr_tensor(  # X^T: (dim, n)
                torch.from_numpy(np.asarray(index.offsets, dtype=np.int64)),
                torch.from_numpy(unpack_ids(index.ids)),
                torch.from_numpy(np.asarray(index.values).astype(np.float32)),
                (self.dim, self.n),
            ).to(self.device)

    def search(self, queries: SparseCodes | np.ndarray, top_n: int, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Top-n ids (q, w) int64 and scores (q, w) float32, w = min(top_n, n), padded with -1 / -inf like `InvertedIndex.search`;
        queries: `SparseCodes` of any k, or dense (q, dim) rows (`head.project`)."""
        ids, scores = self.search_tensors(queries, top_n, batch_size)
        return ids.cpu().numpy(), scores.cpu().numpy()

    def search_tensors(self, queries: SparseCodes | np.ndarray, top_n: int, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """As `search`, with the results left on the device (one host synchronisation per batch, no copy back)."""
        latents, weights = query_weights(queries, self.dim, self.metric, top_n)
        top_n = min(top_n, self.n)  # as InvertedIndex.search: no wider than the index
        out_ids, out_scores = [], []
        for start in range(0, len(weights), batch_size):
            idx = torch.from_numpy(np.ascontiguousarray(latents[start : start + batch_size])).to(self.device)
            ids, scores = self._search_batch(idx, torch.from_numpy(weights[start : start + batch_size]).to(self.device), top_n)
            out_ids.append(ids)
            out_scores.append(scores)
        if not out_ids:
            return torch.empty(0, top_n, dtype=torch.long, device=self.device), torch.empty(0, top_n, device=self.device)
        return torch.cat(out_ids), torch.cat(out_scores)

    def _search_batch(self, idx: torch.Tensor, val: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """idx, val: (b, m) query latents and weights (0: unused) -> ids (b, top_n), scores (b, top_n)."""
        b = idx.shape[0]
        idx, order = idx.sort(dim=1)  # CSR wants ascending columns within a row
        val = val.gather(1, order)
        used = val != 0  # unused slots stay out of the query, so they make no candidates
        crow = torch.zeros(b + 1, dtype=torch.long, device=self.device)
        crow[1:] = used.sum(dim=1).cumsum(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            q = torch.sparse_csr_tensor(crow, idx[used], val[used], (b, self.dim))
            scores = q @ self.postings  # (b, n) sparse: one entry per candidate
        crow, cols, values = scores.crow_indices(), scores.col_indices(), scores.values()
        lengths = crow.diff().long()  # (b,) candidates per query (cuSPARSE returns int32 indices)
        width = int(lengths.max()) if len(values) else 0  # the one host synchronisation of a batch
        ids = torch.full((b, top_n), -1, dtype=torch.long, device=self.device)
        best = torch.full((b, top_n), -torch.inf, device=self.device)
        if width == 0:
            return ids, best
        row = torch.repeat_interleave(torch.arange(b, device=self.device), lengths, output_size=len(values))
        pos = torch.arange(len(values), device=self.device) - crow[row].long()
        laid = torch.full((b, width), -torch.inf, device=self.device).index_put_((row, pos), values)
        laid_ids = torch.full((b, width), -1, dtype=torch.long, device=self.device).index_put_((row, pos), cols.long())
        top = laid.topk(min(top_n, width), dim=1)
        found = top.values > -torch.inf  # a candidate's score has any sign with a dense query; padding is -inf
        ids[:, : top.values.shape[1]] = torch.where(found, laid_ids.gather(1, top.indices), -1)
        best[:, : top.values.shape[1]] = torch.where(found, top.values, -torch.inf)
        return ids, best
