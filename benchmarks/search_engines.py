"""Serve the same k-sparse codes three ways on this CPU: csrv2's built-in index, Milvus Lite and Qdrant's local mode.

What is measured, for each data family, database size n and engine (top-10, metric ip):
    insert s:   from codes in memory to a searchable store on disk. Built-in: InvertedIndex.build + save (one file);
                Milvus: the whole `csrv2.search.milvus.export_codes` call, into `MilvusClient("<tmp>/codes.db")`;
                Qdrant: the whole `csrv2.search.qdrant.export_codes` call, into `QdrantClient(path=<tmp>)`.
    build s:    the part of insert s that builds the index. Built-in: InvertedIndex.build alone (save is the rest);
                Milvus: the `client.flush` that export_codes ends with, timed apart (printed "x flush"); the collection
                is created with its SPARSE_INVERTED_INDEX and Milvus Lite indexes the rows as they arrive, so its index
                build sits inside the inserts and cannot be told apart (the flush took <= 0.01 s up to 1M rows);
                Qdrant's local mode keeps plain lists of points and builds no index (none).
    disk MB:    a recursive size of what the engine left on disk once closed: the index file, the Milvus Lite .db
                folder and files, the Qdrant path folder.
    one query:  median seconds of --single calls with one query each (one more call first, to warm up; the built-in
                index searches the file as `InvertedIndex.open` maps it).
    batch s:    one call with --batch queries (each engine splits them into requests as its `search_codes` does).
    top-10:     agreement with brute force (search_cpu.reference_top on the float16-rounded values the built-in index
                stores): the mean, over the batch's queries, of the share of the reference top-10 ids found in the engine's.
                Milvus and Qdrant store float32, so near-ties may order differently: reported, not asserted. The
                built-in index's top-10 must equal brute force exactly at n <= --check-n (exit 1 if not), as in search_cpu.
Peak memory is not reported: Milvus Lite serves from a child process and resource.getrusage is process-wide, so
neither engine's share can be told apart.

Data, documents drawn with search_cpu's helpers (k distinct latents per code from a skewed law) at each --ks k, and
queries coded at --query-k (default csrv2.config.DEFAULT_QUERY_K = 32: asymmetric search, as users run it):
    real:       h = the head's (1536 for the suite's heads), with --head HEAD_DIR --documents D.npy --queries Q.npy: the
                law is each latent's share of encode(head, D, k) (search_cpu.usage_law); the queries are the real query
                embeddings, cycled to the number needed, coded by the head at --query-k.
    synthetic:  h = --hidden-dim (16384), search_cpu's Zipf law p_j ~ 1 / (j + 10)^s, s = --zipf (1), for documents and
                queries (drawn at --query-k).
Sizes: 10k (where the built-in index is checked against brute force, and Qdrant is measured), 100k and 1M. Qdrant's
local mode is a pure-Python emulation: its upsert commits each point to SQLite on its own, and a search scores every
stored point in a Python loop. On 2 shared cores, at 10k: insert 21-181 s (disk-bound), 0.13-0.23 s a query; at 100k
(the last command below): insert 455 s, 1.5 s a query, 117 s for 64 queries. So it is measured up to --qdrant-max-n
points (default 10k) only; rows above that are printed as not measured, with what was measured below, and nothing is
extrapolated. The default run (--head, both families) took 14 minutes on one thread, most of it Qdrant's 10k rows.

    python benchmarks/search_engines.py                                  # synthetic only: n = 10k, 100k, 1M
    python benchmarks/search_engines.py --head HEAD_DIR --documents D.npy --queries Q.npy   # real and synthetic
    python benchmarks/search_engines.py --sizes 10000 --engines builtin,milvus --json engines.json
    python benchmarks/search_engines.py --head HEAD_DIR --documents D.npy --queries Q.npy --families real \
        --engines qdrant --sizes 100000 --qdrant-max-n 100000 --single 10 --batch 64

Run with OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1 for one thread on every side (the built-in index's
search is single-threaded anyway). Milvus Lite serves from a child process with thread pools of its own (7 threads seen),
which these variables reach but do not confine to one core.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from csrv2.codes import SparseCodes
from csrv2.config import DEFAULT_QUERY_K
from csrv2.search.index import InvertedIndex
from search_cpu import TOP_N, drawn_codes, query_rows, reference_top, timed, usage_law, zipf_law

ENGINES = ("builtin", "milvus", "qdrant")
REFERENCE_BYTES = 1 << 30  # brute force's (chunk, n) dense scores and candidate masks, ~21 bytes an entry, stay near this


def disk_bytes(path: Path) -> int:
    """Bytes of the files under path (or of path itself when it is a file), links not followed."""
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
               if not os.path.islink(os.path.join(root, f)))


def chunked_reference(db: SparseCodes, queries: SparseCodes, metric: str) -> np.ndarray:
    """(q, TOP_N) brute-force ids, search_cpu.reference_top over chunks of queries: it holds (chunk, n) dense scores and
    masks (about 21 bytes an entry), so the chunk is sized to keep that near REFERENCE_BYTES at any n."""
    chunk = max(1, REFERENCE_BYTES // (21 * max(len(db), 1)))
    return np.concatenate([reference_top(db, query_rows(queries, s, s + chunk), metric) for s in range(0, len(queries), chunk)])


def agreement(found: np.ndarray, reference: np.ndarray) -> float:
    """Mean over rows of the share of reference ids (-1 padding left out) also in found; rows with none are skipped.
    found, reference: (q, TOP_N) int64."""
    shares = [np.isin(ref[ref >= 0], row).mean() for ref, row in zip(reference, found) if (ref >= 0).any()]
    return float(np.mean(shares)) if shares else float("nan")


def serve_builtin(db: SparseCodes, folder: Path, metric: str) -> tuple[dict, object, object]:
    """Build and save the index, open the file: ({insert_s, build_s}, search(queries) -> ids, close())."""
    start = time.perf_counter()
    index = InvertedIndex.build(db, metric)
    built = time.perf_counter()
    index.save(folder / "index.csrv2")
    times = {"insert_s": time.perf_counter() - start, "build_s": built - start}
    served = InvertedIndex.open(folder / "index.csrv2")
    return times, lambda q: served.search(q, TOP_N)[0], lambda: None


def serve_milvus(db: SparseCodes, folder: Path, metric: str) -> tuple[dict, object, object]:
    """export_codes into a fresh Milvus Lite file, its closing flush timed apart: ({insert_s, build_s}, search, close)."""
    from pymilvus import MilvusClient

    from csrv2.search import milvus
    client, flushed = MilvusClient(str(folder / "codes.db")), []
    flush = client.flush

    def timed_flush(*args, **kwargs):  # export_codes ends with one flush: the seal and index build
        start = time.perf_counter()
        flush(*args, **kwargs)
        flushed.append(time.perf_counter() - start)
    client.flush = timed_flush
    start = time.perf_counter()
    milvus.export_codes(db, client, "codes", metric=metric, progress=False)
    times = {"insert_s": time.perf_counter() - start, "build_s": sum(flushed)}

    def close():  # client.close only drops the connection: stop the Milvus Lite server too, which writes out and frees the rows
        from milvus_lite.server_manager import server_manager_instance
        client.close()
        server_manager_instance.release_server(str(folder / "codes.db"))
    return times, lambda q: milvus.search_codes(client, "codes", q, TOP_N, metric)[0], close


def serve_qdrant(db: SparseCodes, folder: Path, metric: str) -> tuple[dict, object, object]:
    """export_codes into a fresh Qdrant local-mode folder: ({insert_s, build_s: None}, search, close)."""
    from qdrant_client import QdrantClient

    from csrv2.search import qdrant
    client = QdrantClient(path=str(folder))
    start = time.perf_counter()
    qdrant.export_codes(db, client, "codes", metric=metric, progress=False)
    times = {"insert_s": time.perf_counter() - start, "build_s": None}  # local mode builds no index
    return times, lambda q: qdrant.search_codes(client, "codes", q, TOP_N, metric)[0], client.close


SERVE = {"builtin": serve_builtin, "milvus": serve_milvus, "qdrant": serve_qdrant}


def bench_engine(engine: str, db: SparseCodes, queries: SparseCodes, reference: np.ndarray, a) -> tuple[dict, bool | None]:
    """One row of the table for one engine over db (n, k) with queries (q, query_k), and (built-in, n <= --check-n) whether
    its top-10 equals the brute-force reference (q, TOP_N) exactly."""
    with tempfile.TemporaryDirectory(prefix=f"csrv2-{engine}-", dir=a.tmp) as tmp:
        folder = Path(tmp)
        times, search, close = SERVE[engine](db, folder, a.metric)
        ones = [query_rows(queries, i, i + 1) for i in range(a.single + 1)]
        single, batch, found, ids = timed(search, ones, queries)
        close()  # what is left on disk once the engine let go of it
        size = disk_bytes(folder)
    same = None
    if engine == "builtin" and len(db) <= a.check_n:  # the batch's ids, and the single queries' against the batch's
        same = np.array_equal(ids, reference) and np.array_equal(np.concatenate(found), ids[1 : a.single + 1])
    return {"engine": engine, **times, "disk_bytes": size, "single_ms": 1e3 * single, "batch_s": batch,
            "agreement": agreement(ids, reference)}, same


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="database sizes n, comma-separated")
    p.add_argument("--ks", default="2", help="documents' non-zeros per code, comma-separated")
    p.add_argument("--query-k", type=int, default=DEFAULT_QUERY_K, help="non-zeros per query code (asymmetric search)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--families", default="real,synthetic",
                   help="comma-separated, of real (needs --head) and synthetic; real is skipped, and said so, without --head")
    p.add_argument("--hidden-dim", type=int, default=16384, help="h of the synthetic family")
    p.add_argument("--zipf", type=float, default=1.0, help="skew s of the synthetic family's latent use, p_j ~ 1 / (j + 10)^s")
    p.add_argument("--head", metavar="HEAD_DIR", help="a csrv2 head folder: the real family (needs --documents, --queries)")
    p.add_argument("--documents", metavar="D.npy", help="with --head: document embeddings whose codes give the latent law")
    p.add_argument("--queries", metavar="Q.npy", help="with --head: query embeddings, cycled to the number of queries timed")
    p.add_argument("--metric", default="ip", choices=("ip", "cosine"))
    p.add_argument("--qdrant-max-n", type=int, default=10_000,
                   help="largest n Qdrant's local mode is measured at (it scores every point in Python per query)")
    p.add_argument("--single", type=int, default=50, help="single queries timed (the median is reported)")
    p.add_argument("--batch", type=int, default=512, help="queries in the timed batch")
    p.add_argument("--check-n", type=int, default=10000, help="check the built-in index against brute force up to this n")
    p.add_argument("--tmp", default=None, help="folder for the engines' temporary stores (default: the system's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write all numbers to this JSON file")
    a = p.parse_args(argv)
    engines = [e.strip() for e in a.engines.split(",")]
    families = [f.strip() for f in a.families.split(",")]
    if bad := [e for e in engines if e not in ENGINES]:
        p.error(f"unknown engines {bad}; choose from {ENGINES}")
    if bad := [f for f in families if f not in ("real", "synthetic")]:
        p.error(f"unknown families {bad}; choose from real, synthetic")
    if a.head and not (a.documents and a.queries):
        p.error("--head needs --documents and --queries")
    if "real" in families and not a.head:
        print("the real family needs --head, --documents and --queries: skipped")
        families.remove("real")
    rng = np.random.default_rng(a.seed)
    sizes, ks = [int(s) for s in a.sizes.split(",")], [int(k) for k in a.ks.split(",")]
    nq = max(a.batch, a.single + 1)

    laws, query_sets = {}, {}  # family -> {k: law} and family -> (nq, query_k) codes, shared by every n and engine
    if "real" in families:
        from csrv2.head import encode  # torch: only with --head
        from csrv2.model import load_head
        head = load_head(a.head)
        documents, real_queries = np.load(a.documents), np.load(a.queries)
        laws["real"] = {k: usage_law(encode(head, documents, k, progress=False)) for k in ks}
        query_sets["real"] = encode(head, real_queries[np.arange(nq) % len(real_queries)], a.query_k, progress=False)
        print(f"real: head {a.head}, h={head.config.hidden_dim}; laws from {len(documents)} documents; "
              f"{len(real_queries)} real queries cycled to {nq}")
    if "synthetic" in families:
        law = zipf_law(a.hidden_dim, a.zipf, rng)
        laws["synthetic"] = {k: law for k in ks}
        query_sets["synthetic"] = drawn_codes(nq, a.query_k, law, rng)
    versions = {}
    for engine, package in (("milvus", "pymilvus"), ("milvus", "milvus-lite"), ("qdrant", "qdrant-client")):
        if engine in engines:
            versions[package] = importlib.metadata.version(package)
    print(f"numpy {np.__version__}, {versions}; engines {engines}; ks={ks} query k={a.query_k} metric={a.metric} top-{TOP_N}; "
          f"single: median of {a.single}, batch: {nq}; OMP/MKL/NUMBA threads: "
          + "/".join(os.environ.get(v, "unset") for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")), flush=True)

    rows, skipped, ok = [], [], True
    started = time.perf_counter()
    for family in families:
        queries = query_sets[family]
        for k in ks:
            for n in sizes:
                db = drawn_codes(n, k, laws[family][k], rng)
                t = time.perf_counter()
                reference = chunked_reference(db, queries, a.metric)
                print(f"{family} k={k} n={n}: brute-force top-{TOP_N} of {nq} queries in {time.perf_counter() - t:.1f} s", flush=True)
                for engine in engines:
                    if engine == "qdrant" and n > a.qdrant_max_n:
                        skipped.append({"family": family, "k": k, "n": n, "engine": engine})
                        continue
                    row, same = bench_engine(engine, db, queries, reference, a)
                    rows.append({"family": family, "h": db.dim, "k": k, "query_k": a.query_k, "n": n, **row})
                    print(f"  done {engine} ({time.perf_counter() - started:.0f} s so far)", flush=True)
                    if same is not None:
                        print(f"check {family} k={k} n={n} built-in, {nq} queries vs brute force: {'OK' if same else 'MISMATCH'}")
                        ok &= bool(same)
                del db, reference

    print(f"\n| family | h | k | n | engine | insert s | build s | disk MB | one query ms | {nq}-batch s | top-{TOP_N} agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        build = "none" if r["build_s"] is None else f"{r['build_s']:.2f}" + (" flush" if r["engine"] == "milvus" else "")
        print(f"| {r['family']} | {r['h']} | {r['k']} | {r['n']:,} | {r['engine']} | {r['insert_s']:.2f} | {build} | "
              f"{r['disk_bytes'] / 1e6:.1f} | {r['single_ms']:.2f} | {r['batch_s']:.3f} | {r['agreement']:.4f} |")
    for s in skipped:  # say why, with what was measured below the cap
        below = [r for r in rows if r["engine"] == "qdrant" and r["family"] == s["family"] and r["k"] == s["k"]]
        seen = "; ".join(f"at n={r['n']:,}: insert {r['insert_s']:.1f} s, one query {r['single_ms']:.0f} ms, "
                         f"{nq}-batch {r['batch_s']:.1f} s" for r in below)
        print(f"qdrant {s['family']} k={s['k']} n={s['n']:,}: not measured, above --qdrant-max-n {a.qdrant_max_n:,} "
              f"(local mode scores every point in Python for each query{'; ' + seen if seen else ''})")
    print(f"total {time.perf_counter() - started:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "versions": versions, "queries": nq, "rows": rows, "not_measured": skipped,
                       "check_ok": ok, "seconds": time.perf_counter() - started}, f, indent=2)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
