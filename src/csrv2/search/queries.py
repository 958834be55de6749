"""The query side of a search: documents are stored at their k, and a query need not match it.

Stored codes cost bytes per document, the query side costs nothing stored, so csrv2 codes a query
richer than its documents (asymmetric search):
  codes at query_k   the head's TopK at query_k latents (>= the documents' k): m latents touch m posting lists;
  dense              `head.project`: every latent weighed, the query against each document's decoded code,
                     exact, reading every list (cost grows with the index, like a flat scan of 5-byte postings).
DEFAULT_QUERY_K is the query k of `csrv2 search` and of the suite's asymmetric protocol, chosen from
docs/benchmarks.md's table of quality (validation splits) and latency per query k.
"""

from __future__ import annotations

import numpy as np

from ..codes import SparseCodes
from ..config import DEFAULT_QUERY_K
from ..head import SparseHead, encode, project


def query_k_for(head: SparseHead, query_k: int | None) -> int:
    """The query k used: `query_k`, else DEFAULT_QUERY_K, never below the head's own k nor above its latents."""
    if query_k is not None:
        return query_k
    return min(max(DEFAULT_QUERY_K, head.config.k), head.config.hidden_dim)


def encode_queries(head: SparseHead, embeddings, query_k: int | None = None, dense: bool = False, *,
                   batch_size: int = 4096, progress: bool | None = False) -> SparseCodes | np.ndarray:
    """(q, input_dim) query embeddings -> what `InvertedIndex.search` takes: (q, query_k) codes, or (q, hidden_dim) dense rows."""
    if dense:
        if query_k is not None:
            raise ValueError("a dense query weighs every latent; drop query k or dense")
        return project(head, embeddings, batch_size=batch_size, progress=progress)
    return encode(head, embeddings, query_k_for(head, query_k), batch_size=batch_size, progress=progress)


__all__ = ["DEFAULT_QUERY_K", "encode_queries", "query_k_for"]
