"""Single-query latency of csrv2.search.milvus on Milvus Lite (the embedded engine, milvus-lite 2.5), on this CPU.

n uniform random k-sparse codes at h (default 100k, k = 2, h = 1536), values in (0, 1], exported with `export_codes`
to a fresh .db file; then the median latency of single top-10 queries (k = 2 codes drawn like the documents) through
`search_codes` and through `client.search` alone (what Milvus takes, without csrv2's settings check), and of a few
dense signed queries (`head.project`-like rows: every stored code is a candidate).

    python benchmarks/search_milvus.py [--setup shipped|noflush] [--n 100000] [--k 2] [--dim 1536] [--queries 100]

--setup noflush skips the flush `export_codes` ends with: the rows are searched in their growing segment.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from pymilvus import MilvusClient

from csrv2.codes import SparseCodes
from csrv2.search import milvus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", choices=["shipped", "noflush"], default="shipped")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--queries", type=int, default=100)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    latents = np.argsort(rng.random((a.n, a.dim)), axis=1)[:, : a.k].astype(np.int32)
    codes = SparseCodes(latents, (1.0 - rng.random((a.n, a.k))).astype(np.float32), a.dim)
    with tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(str(Path(tmp) / "codes.db"))
        if a.setup == "noflush":
            client.flush = lambda *args, **kwargs: None
        t = time.perf_counter()
        milvus.export_codes(codes, client, "codes", progress=False)
        print(f"{a.setup}: export of {a.n:,} codes (k = {a.k}, h = {a.dim}): {time.perf_counter() - t:.1f} s")
        rows = rng.integers(0, a.n, a.queries)
        queries = [SparseCodes(codes.indices[r : r + 1], codes.values[r : r + 1], a.dim) for r in rows]
        first, lat, raw = None, [], []
        for q in queries:
            t = time.perf_counter()
            milvus.search_codes(client, "codes", q, 10)
            lat.append(time.perf_counter() - t)
            first = lat[0] if first is None else first
            vector = dict(zip(q.indices[0].tolist(), q.values[0].tolist()))
            t = time.perf_counter()
            client.search("codes", [vector], limit=10, anns_field=milvus.VECTOR, search_params=milvus.SEARCH_PARAMS)
            raw.append(time.perf_counter() - t)
        print(f"{a.setup}: search_codes, one query: first {first * 1e3:.1f} ms, median {np.median(lat) * 1e3:.2f} ms, "
              f"p90 {np.percentile(lat, 90) * 1e3:.2f} ms over {len(lat)}; client.search alone: median {np.median(raw) * 1e3:.2f} ms")
        dense = []
        for row in rng.normal(size=(5, a.dim)).astype(np.float32):
            t = time.perf_counter()
            milvus.search_codes(client, "codes", row[None], 10)
            dense.append(time.perf_counter() - t)
        print(f"{a.setup}: search_codes, one dense signed query: median {np.median(dense) * 1e3:.0f} ms over {len(dense)}")
        client.close()


if __name__ == "__main__":
    main()
