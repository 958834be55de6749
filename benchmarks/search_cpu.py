"""Time csrv2's inverted index against faiss flat inner-product search on dense vectors, on this CPU.

What is measured, for each database size n and each method: build time (index construction only, not
data generation), index bytes and bytes per vector, the median latency of single queries (one call
per query), and one batch of queries (total time, queries/s). Top-10 throughout.

    ours:      csrv2.search.index.InvertedIndex over k-sparse codes at h = 16384 (k = 2 and 8). The codes are
               synthetic and *skewed* like a trained head's latents: each code holds k distinct latents
               drawn successively (without replacement, the same law as Gumbel-top-k on log p) from
               p_j ~ 1 / (j + 10)^s, s = 1 (ids shuffled), values |N(0, 1)| + 0.1; queries alike.
               `--usage-from CODES.npz`: p_j is instead each latent's share of a real head's codes
               (its h; latents it never uses stay unused). Skew
               matters: a uniform draw gives lists of n k / h, 2 x 122 postings per query at n = 1M,
               k = 2; this skew gives ~7,500 (printed as postings/q), and a heavy tail, so the median
               single query is cheaper than the batch's mean. `--codes` / `--query-codes`: real codes.
    dense-d:   faiss.IndexFlatIP (exact, brute force) on random L2-normalised float32 vectors, d = 384
               (the MiniLM backbone) and 4096. n * 4d bytes are capped by `--max-dense-bytes`: above it
               the largest n that fits is measured and reported as such (nothing is extrapolated).
    MRL-m:     the same at m = 2 .. 64 dims: a Matryoshka embedding truncated to its first m dims and
               renormalised; for random isotropic vectors that is exactly a random normalised m-d vector.

Asymmetric search with a real head (`--head MODEL_DIR --documents D.npy --queries Q.npy`): for each
documents' k in --ks, p_j is each latent's share of `encode(head, D, k)` (as --usage-from) and the database
is drawn from it at the head's h; the queries are the real query embeddings (cycled to the number timed)
coded by the head at each `--query-ks` entry: "same" (the documents' k), an integer (that query k), or
"dense" (`head.project`: every latent weighed, signed, so every list is read). One row per (documents' k,
query k), "ours k=2 q=32"; postings/q counts the list lengths of the latents a query weighs (a dense query:
nnz). The targets then add, at the largest n and smallest k, each query k's single-query speed-up over
MRL-32 (>= 10x).

Memory: ours is `index.nbytes` (offsets + ids + float16 values), faiss flat is n * d * 4. Our search is
single-threaded (the numba kernel when numba is installed, else numpy); faiss uses its OpenMP threads
(printed). Correctness, on the side: for databases of at most `--check-n` vectors, our top-10 of every
timed query must equal a brute-force reference (scipy sparse products on the same float16-rounded stored
values times float32 query weights, code or dense rows, L2-normalised for cosine; candidates are the
vectors sharing a latent the query weighs non-zero; ties by smaller id); exit 1 if not.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import statistics
import sys
import time

import numpy as np
import scipy.sparse

from csrv2.codes import SparseCodes
from csrv2.search.index import InvertedIndex, query_weights

try:
    import faiss
except ImportError:
    sys.exit("this benchmark needs faiss: pip install faiss-cpu")

TOP_N = 10
TARGETS = {"single_vs_dense_4096": 1000, "single_vs_mrl_32": 50, "batch_vs_mrl_32": 10, "bytes_per_vector_k2": 12,
           "asym_single_vs_mrl_32": 10}  # the last: --head, each query k at the smallest documents' k


def zipf_law(h: int, s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(cdf (h,), perm (h,)): p_j ~ (j + 10)^-s over latents renamed by a random permutation."""
    cdf = np.cumsum((np.arange(h) + 10.0) ** -s)
    return cdf / cdf[-1], rng.permutation(h)


def usage_law(codes: SparseCodes) -> tuple[np.ndarray, np.ndarray]:
    """(cdf (h,), identity perm): each latent's share of the non-zero values of real codes (unused latents: 0)."""
    counts = np.bincount(codes.indices[codes.values > 0], minlength=codes.dim).astype(np.float64)
    return np.cumsum(counts) / counts.sum(), np.arange(codes.dim)


def drawn_codes(n: int, k: int, law: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> SparseCodes:
    """(n, k) codes: k distinct latents per row, drawn successively from the law's cdf, then renamed by its perm."""
    cdf, perm = law
    h = len(cdf)
    out, todo = np.empty((n, k), dtype=np.int32), np.arange(n)
    while todo.size:  # rows whose draws hold fewer than k distinct latents are drawn again
        cand = np.searchsorted(cdf, rng.random((todo.size, 2 * k + 8)), side="right")  # (m, c) with replacement
        order = np.argsort(cand, axis=1, kind="stable")  # a repeated latent's first draw sorts first
        srt = np.take_along_axis(cand, order, axis=1)
        dup = np.zeros(cand.shape, dtype=bool)
        np.put_along_axis(dup, order[:, 1:], srt[:, 1:] == srt[:, :-1], axis=1)  # (m, c) an earlier draw had it
        first = np.argsort(dup, axis=1, kind="stable")[:, :k]  # the first k distinct draws, in draw order
        ok = (~dup).sum(axis=1) >= k
        out[todo[ok]] = np.take_along_axis(cand, first, axis=1)[ok]
        todo = todo[~ok]
    values = np.sort(np.abs(rng.standard_normal((n, k), dtype=np.float32)) + 0.1, axis=1)[:, ::-1]
    return SparseCodes(perm[out].astype(np.int32), np.ascontiguousarray(values), h)


def reference_top(db: SparseCodes, queries: SparseCodes | np.ndarray, metric: str) -> np.ndarray:
    """(q, TOP_N) ids by brute force for code queries or dense (q, dim) rows of any sign: scipy products of the
    float16-rounded stored values and the float32 query weights (each side L2-normalised per row for cosine);
    candidates are the vectors with a stored value on a latent the query weighs non-zero; ties by smaller id."""
    def weights(v):  # (m, c) float64
        if metric == "cosine":
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
        return v
    def matrix(c, v):  # (len(c), dim) float64 CSR without explicit zeros (the index stores none)
        m = scipy.sparse.csr_matrix((v.ravel(), (np.repeat(np.arange(len(c)), c.k), c.indices.ravel())), shape=(len(c), c.dim))
        m.eliminate_zeros()
        return m
    def pattern(m):  # 1 where m holds a value
        return scipy.sparse.csr_matrix((np.ones_like(m.data), m.indices, m.indptr), shape=m.shape)
    d = matrix(db, weights(db.values.astype(np.float64)).astype(np.float16).astype(np.float64))  # what the index stores
    if isinstance(queries, SparseCodes):  # what search multiplies by
        q = matrix(queries, weights(queries.values.astype(np.float64)).astype(np.float32).astype(np.float64))
    else:
        q = scipy.sparse.csr_matrix(weights(np.asarray(queries, dtype=np.float64)).astype(np.float32).astype(np.float64))
    scores = (q @ d.T).toarray().astype(np.float32)  # (q, n), any sign
    cand = (pattern(q) @ pattern(d).T).toarray() > 0  # (q, n) shares a weighed latent
    ids = np.full((len(scores), min(TOP_N, len(db))), -1, dtype=np.int64)
    for r in range(len(scores)):
        c = np.flatnonzero(cand[r])
        top = c[np.lexsort((c, -scores[r, c]))[: ids.shape[1]]]
        ids[r, : len(top)] = top
    return ids


def query_rows(queries: SparseCodes | np.ndarray, start: int, stop: int) -> SparseCodes | np.ndarray:
    """Queries start .. stop-1 as a batch: (m, k) codes or (m, dim) dense rows."""
    if isinstance(queries, SparseCodes):
        return SparseCodes(queries.indices[start:stop], queries.values[start:stop], queries.dim)
    return queries[start:stop]


def timed(search, singles: list, batch) -> tuple[float, float, list, object]:
    """Median seconds of one-query calls on singles[1:] (singles[0] warms up), seconds of one call on the
    batch, and the results of both: (median, seconds, [single results], batch result)."""
    search(singles[0])
    times, found = [], []
    for q in singles[1:]:
        start = time.perf_counter()
        found.append(search(q))
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    result = search(batch)
    return statistics.median(times), time.perf_counter() - start, found, result


def build_index(db: SparseCodes, a) -> tuple[InvertedIndex, float]:
    """Our index over db and the seconds its construction took."""
    start = time.perf_counter()
    index = InvertedIndex.build(db, a.metric)
    return index, time.perf_counter() - start


def bench_queries(index: InvertedIndex, build: float, db: SparseCodes, queries: SparseCodes | np.ndarray, method: str,
                  a) -> tuple[dict, bool | None]:
    """Our row of the table for these queries (codes of any k, or dense rows) and (n <= --check-n) whether the ids
    match brute force."""
    ones = [query_rows(queries, i, i + 1) for i in range(a.single + 1)]
    index.search(query_rows(queries, 0, 2), TOP_N)  # numba compiles for a batch's layouts too (dense: strided latents)
    single, batch, found, (ids, _) = timed(lambda q: index.search(q, TOP_N), ones, queries)
    same = None
    if len(db) <= a.check_n:  # the batch's ids against brute force, the single queries' against the batch's
        same = np.array_equal(reference_top(db, queries, a.metric), ids)
        same &= np.array_equal(np.concatenate([f[0] for f in found]), ids[1 : a.single + 1])
    latents, weights = query_weights(queries, index.dim, index.metric, TOP_N)
    lengths = np.diff(index.offsets)[latents] * (weights != 0)  # (q, m) list length per latent the query weighs
    row = {"method": method, "n": len(db), "build_s": build, "bytes": index.nbytes,
           "bytes_per_vector": index.bytes_per_vector(), "single_ms": 1e3 * single, "batch_s": batch,
           "postings_per_query": float(lengths.sum(axis=1).mean()), "k": db.k}
    return row, same


def bench_dense(n: int, d: int, label: str, nq: int, a, rng: np.random.Generator) -> dict:
    """faiss.IndexFlatIP over n random normalised d-dim vectors; build = one `add` of them all (a copy)."""
    def normal(m):  # (m, d) float32, generated in 256 MB chunks so that only the result is held
        x = np.empty((m, d), dtype=np.float32)
        for start in range(0, m, max(1, (1 << 26) // d)):
            chunk = rng.standard_normal((min(m - start, (1 << 26) // d), d), dtype=np.float32)
            x[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
        return x
    x, index = normal(n), faiss.IndexFlatIP(d)
    start = time.perf_counter()
    index.add(x)  # peak memory: the data and the index's copy, 2 n d 4 bytes
    build = time.perf_counter() - start
    del x
    xq = normal(nq)
    single, batch, _, _ = timed(lambda q: index.search(q, TOP_N), [xq[i : i + 1] for i in range(a.single + 1)], xq)
    return {"method": label, "n": n, "build_s": build, "bytes": n * d * 4, "bytes_per_vector": d * 4.0,
            "single_ms": 1e3 * single, "batch_s": batch}


def query_kinds(text: str) -> list:
    """--query-ks "same,32,dense" -> ["same", 32, "dense"]: the documents' k, a query k >= 1, or dense rows."""
    kinds = []
    for item in text.split(","):
        item = item.strip()
        if item in ("same", "dense"):
            kinds.append(item)
        elif item.isdigit() and int(item) >= 1:
            kinds.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"--query-ks entries are 'same', 'dense' or a k >= 1, got {item!r}")
    return kinds


def head_queries(head, embeddings: np.ndarray, k: int, kinds: list, cache: dict) -> dict:
    """Query label ("2", "32", "dense") -> the embeddings coded by the head at that query k ("same": the documents'
    k) or projected (dense rows), in --query-ks order, without repeats; `cache` keeps each one made across calls."""
    from csrv2.head import encode, project  # torch: only with --head
    out = {}
    for kind in kinds:
        kind = k if kind == "same" else kind
        if kind not in cache:
            cache[kind] = project(head, embeddings, progress=False) if kind == "dense" else encode(head, embeddings, kind, progress=False)
        out.setdefault(str(kind), cache[kind])
    return out


def ratio(rows, size, num, den, key):
    """rows[den][key] / rows[num][key] at database size `size`, with the n each was measured at."""
    pick = {r["method"]: r for r in rows if r["size"] == size}
    if num not in pick or den not in pick:
        return None
    return {"value": pick[den][key] / pick[num][key], "n_ours": pick[num]["n"], "n_baseline": pick[den]["n"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="database sizes n, comma-separated")
    p.add_argument("--hidden-dim", type=int, default=16384, help="h, latents of the synthetic codes")
    p.add_argument("--ks", default="2,8", help="non-zeros per synthetic code, comma-separated")
    p.add_argument("--zipf", type=float, default=1.0, help="skew s of latent use, p_j ~ 1 / (j + 10)^s")
    p.add_argument("--usage-from", metavar="CODES.npz",
                   help="draw synthetic codes from the latent usage measured on these real codes (csrv2 encode), at their h, "
                        "instead of the Zipf law")
    p.add_argument("--codes", help="a SparseCodes .npz (csrv2 encode) to index instead of synthetic codes")
    p.add_argument("--query-codes", help="queries for --codes (default: a random sample of --codes' rows)")
    p.add_argument("--head", metavar="MODEL_DIR",
                   help="a csrv2 head folder: asymmetric search with real latent usage and real queries (needs --documents, --queries)")
    p.add_argument("--documents", metavar="D.npy",
                   help="with --head: (n, d) document embeddings; the synthetic codes follow the latent usage of encode(head, D, k)")
    p.add_argument("--queries", metavar="Q.npy", help="with --head: (q, d) query embeddings, cycled to the number of queries timed")
    p.add_argument("--query-ks", type=query_kinds, default="same,32,128,dense",
                   help="with --head: how queries are coded, comma-separated: 'same' (the documents' k), a query k, "
                        "or 'dense' (head.project)")
    p.add_argument("--metric", default="ip", choices=("ip", "cosine"), help="our index's metric")
    p.add_argument("--dense-dims", default="2,4,8,16,32,64,384,4096", help="faiss baselines; <= 64 are named MRL")
    p.add_argument("--max-dense-bytes", type=float, default=4e9,
                   help="cap on n * d * 4 bytes of one faiss index (its build briefly holds twice that)")
    p.add_argument("--single", type=int, default=50, help="single queries timed (the median is reported)")
    p.add_argument("--batch", type=int, default=512, help="queries in the timed batch")
    p.add_argument("--check-n", type=int, default=10000, help="check ours against brute force up to this n")
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss's default)")
    p.add_argument("--profile", action="store_true", help="cProfile our single queries at the largest n, smallest k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write all numbers to this JSON file")
    a = p.parse_args(argv)
    if a.head and not (a.documents and a.queries):
        p.error("--head needs --documents and --queries")
    if a.head and (a.codes or a.usage_from):
        p.error("--head draws codes from its own latent usage: drop --codes / --usage-from")
    if not a.head and (a.documents or a.queries):
        p.error("--documents and --queries go with --head")
    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    sizes = [int(s) for s in a.sizes.split(",")]
    nq = max(a.batch, a.single + 1)
    if a.codes:  # real codes: one k, and no size beyond what the file holds
        real = SparseCodes.load(a.codes)
        src = SparseCodes.load(a.query_codes) if a.query_codes else real
        pick = np.arange(min(nq, len(src))) if a.query_codes else np.sort(rng.choice(len(src), min(nq, len(src)), replace=False))
        queries, nq = SparseCodes(src.indices[pick], src.values[pick], src.dim), len(pick)
        if nq < a.single + 1:
            sys.exit(f"{nq} query codes: need at least --single + 1 = {a.single + 1}")
        if max(sizes) > len(real):
            print(f"--codes holds {len(real)} codes: sizes above that are measured at n = {len(real)}")
        sizes = sorted({min(s, len(real)) for s in sizes})
        ks, h = [real.k], real.dim
    else:
        ks = [int(k) for k in a.ks.split(",")]
        if a.head:  # one law per documents' k, measured on the real documents' codes
            from csrv2.head import encode
            from csrv2.model import load_head
            head = load_head(a.head)
            h, documents = head.config.hidden_dim, np.load(a.documents)
            if bad := [q for q in a.query_ks if q != "dense" and q != "same" and q > h]:
                p.error(f"--query-ks {bad} exceed the head's h = {h}")
            real_queries = np.load(a.queries)
            query_embeddings, query_cache = real_queries[np.arange(nq) % len(real_queries)], {}  # cycled to nq
            laws = {k: usage_law(encode(head, documents, k, progress=False)) for k in ks}
            for k, law in laws.items():
                share = np.diff(law[0], prepend=0)
                print(f"latent law of encode(head, {len(documents)} documents, k={k}): {(share > 0).sum()} of {h} latents used, "
                      f"the top 1% of latents hold {np.sort(share)[::-1][: max(1, h // 100)].sum():.0%} of the values")
        elif a.usage_from:
            measured = SparseCodes.load(a.usage_from)
            law, h = usage_law(measured), measured.dim
            used = np.diff(law[0], prepend=0) > 0
            print(f"latent law measured on {len(measured)} codes of {a.usage_from}: {used.sum()} of {h} latents used, "
                  f"the top 1% of latents hold {np.sort(np.diff(law[0], prepend=0))[::-1][: max(1, h // 100)].sum():.0%} of the values")
        else:
            law, h = zipf_law(a.hidden_dim, a.zipf, rng), a.hidden_dim
    print(f"faiss {faiss.__version__}, omp_get_max_threads() = {faiss.omp_get_max_threads()}; numpy {np.__version__}; "
          f"h={h} ks={ks} law={'measured' if a.usage_from or a.head else f'zipf s={a.zipf}'} metric={a.metric} top-{TOP_N}; "
          f"single: median of {a.single}, batch: {nq}"
          + (f"; head {a.head}, {len(real_queries)} real queries cycled, query ks {a.query_ks}" if a.head else ""))

    rows, ok, profile_case = [], True, None
    for size in sizes:
        for k in ks:
            if a.head:  # one index, timed with each kind of query
                db = drawn_codes(size, k, laws[k], rng)
                index, build = build_index(db, a)
                cases = [(f"ours k={k} q={label}", qs) for label, qs in head_queries(head, query_embeddings, k, a.query_ks,
                                                                                   query_cache).items()]
            else:
                if a.codes:
                    db, qs = SparseCodes(real.indices[:size], real.values[:size], h), queries
                else:
                    db, qs = drawn_codes(size, k, law, rng), drawn_codes(nq, k, law, rng)
                index, build = build_index(db, a)
                cases = [(f"ours k={db.k}", qs)]
            for method, qs in cases:
                row, same = bench_queries(index, build, db, qs, method, a)
                rows.append({"size": size, **row})
                print(f"  done {method} n={size}", flush=True)
                if same is not None:
                    print(f"check n={size} {method}, {len(qs)} queries vs brute force: {'OK' if same else 'MISMATCH'}")
                    ok &= bool(same)
            if size == max(sizes) and k == min(ks):
                profile_case = (index, cases[0][1])
        for d in (int(d) for d in a.dense_dims.split(",")):
            n = min(size, int(a.max_dense_bytes // (4 * d)))
            if n < size:
                print(f"dense {d}-d at n={size} needs {size * d * 4 / 1e9:.1f} GB > --max-dense-bytes: measured at n={n}")
            rows.append({"size": size, **bench_dense(n, d, f"MRL-{d}" if d <= 64 else f"dense-{d}", nq, a, rng)})
            print(f"  done {rows[-1]['method']} n={n}", flush=True)

    w = max(10, *(len(r["method"]) for r in rows))
    print(f"\n{'size':>9s} {'method':{w}s} {'n measured':>10s} {'build s':>8s} {'index MB':>9s} {'B/vec':>7s} "
          f"{'single ms':>10s} {'batch s':>8s} {'batch q/s':>10s} {'postings/q':>10s}")
    for r in rows:
        print(f"{r['size']:9d} {r['method']:{w}s} {r['n']:10d} {r['build_s']:8.3f} {r['bytes'] / 1e6:9.1f} "
              f"{r['bytes_per_vector']:7.2f} {r['single_ms']:10.3f} {r['batch_s']:8.3f} {nq / r['batch_s']:10.0f} "
              f"{r.get('postings_per_query', float('nan')):10.0f}")

    top, k0 = max(sizes), min(ks)
    ours = f"ours k={k0} q={k0}" if a.head else f"ours k={k0}"  # --head: queries at the documents' k, if measured
    ratios = {"single_vs_dense_4096": ratio(rows, top, ours, "dense-4096", "single_ms"),
              "single_vs_mrl_32": ratio(rows, top, ours, "MRL-32", "single_ms"),
              "batch_vs_mrl_32": ratio(rows, top, ours, "MRL-32", "batch_s")}
    asym = {r["method"]: ratio(rows, top, r["method"], "MRL-32", "single_ms")  # --head: each query kind, documents at k0
            for r in rows if a.head and r["size"] == top and r.get("k") == k0}
    asym = {method: r for method, r in asym.items() if r}
    bpv = next(r["bytes_per_vector"] for r in rows if r["size"] == top and r.get("k") == k0)
    print(f"\ntargets at database size {top}, k={k0}, h={h} (speed-up = baseline time / our time"
          f"{'; ours: ' + ours if a.head else ''}):")
    shown = [(name, r, TARGETS[name]) for name, r in ratios.items() if r]
    shown += [(f"single_vs_mrl_32 q={method.rsplit('q=', 1)[1]}", r, TARGETS["asym_single_vs_mrl_32"]) for method, r in asym.items()]
    w = max(22, *(len(name) for name, _, _ in shown)) if shown else 22
    for name, r, target in shown:
        met = "met" if r["value"] >= target else "NOT met"
        print(f"  {name:{w}s} {r['value']:10.2f}x  target >= {target}x: {met}"
              f"   (ours at n={r['n_ours']}, baseline at n={r['n_baseline']})")
    met = "met" if bpv <= TARGETS["bytes_per_vector_k2"] else "NOT met"
    print(f"  {'bytes_per_vector':{w}s} {bpv:10.2f}   target <= {TARGETS['bytes_per_vector_k2']}: {met} (offsets included)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")

    if a.profile and profile_case:
        index, qs = profile_case
        ones = [query_rows(qs, i, i + 1) for i in range(a.single)]
        prof = cProfile.Profile()
        prof.runcall(lambda: [index.search(q, TOP_N) for q in ones])
        print(f"\ncProfile of {a.single} single queries, n={len(index)} k={k0} (tottime, top 15):")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
                       "queries": nq, "rows": rows, "ratios": ratios, "asym_single_vs_mrl_32": asym, "bytes_per_vector_k2": bpv,
                       "targets": TARGETS, "check_ok": ok}, f, indent=2)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
