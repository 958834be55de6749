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

Memory: ours is `index.nbytes` (offsets + ids + float16 values), faiss flat is n * d * 4. Our search is
single-threaded (the numba kernel when numba is installed, else numpy); faiss uses its OpenMP threads
(printed). Correctness, on the side: for databases of at most `--check-n` vectors, our top-10 of every
timed query must equal a brute-force reference (scipy sparse product on the same float16-rounded
values, ties by smaller id); exit 1 if not.
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
from csrv2.search.index import InvertedIndex

try:
    import faiss
except ImportError:
    sys.exit("this benchmark needs faiss: pip install faiss-cpu")

TOP_N = 10
TARGETS = {"single_vs_dense_4096": 1000, "single_vs_mrl_32": 50, "batch_vs_mrl_32": 10, "bytes_per_vector_k2": 12}


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


def reference_top(db: SparseCodes, queries: SparseCodes, metric: str) -> np.ndarray:
    """(q, TOP_N) ids by brute force: scipy product on float16-rounded stored values, ties by smaller id."""
    def weights(c):
        v = c.values.astype(np.float64)
        if metric == "cosine":
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
        return v
    def matrix(c, v):  # (len(c), dim) float64 CSR
        return scipy.sparse.csr_matrix((v.ravel(), (np.repeat(np.arange(len(c)), c.k), c.indices.ravel())), shape=(len(c), c.dim))
    d = matrix(db, weights(db).astype(np.float16).astype(np.float64))  # what the index stores
    q = matrix(queries, weights(queries).astype(np.float32).astype(np.float64))  # what search multiplies by
    scores = (q @ d.T).toarray().astype(np.float32)  # (q, n); all values > 0, so 0 = shares no latent
    ids = np.full((len(queries), TOP_N), -1, dtype=np.int64)
    for r, s in enumerate(scores):
        top = np.lexsort((np.arange(len(s)), -s))[:TOP_N]
        ids[r, : (s[top] > 0).sum()] = top[s[top] > 0]
    return ids


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


def bench_sparse(db: SparseCodes, queries: SparseCodes, a) -> tuple[dict, InvertedIndex, np.ndarray | None]:
    """Our row of the table, the index, and (n <= --check-n) whether its ids match brute force."""
    start = time.perf_counter()
    index = InvertedIndex.build(db, a.metric)
    build = time.perf_counter() - start
    ones = [SparseCodes(queries.indices[i : i + 1], queries.values[i : i + 1], queries.dim) for i in range(a.single + 1)]
    single, batch, found, (ids, _) = timed(lambda q: index.search(q, TOP_N), ones, queries)
    same = None
    if len(db) <= a.check_n:  # the batch's ids against brute force, the single queries' against the batch's
        same = np.array_equal(reference_top(db, queries, a.metric), ids)
        same &= np.array_equal(np.concatenate([f[0] for f in found]), ids[1 : a.single + 1])
    lengths = np.diff(index.offsets)[queries.indices] * (queries.values != 0)  # (q, k) list length per query latent
    row = {"method": f"ours k={db.k}", "n": len(db), "build_s": build, "bytes": index.nbytes,
           "bytes_per_vector": index.bytes_per_vector(), "single_ms": 1e3 * single, "batch_s": batch,
           "postings_per_query": float(lengths.sum(axis=1).mean())}
    return row, index, same


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
        if a.usage_from:
            measured = SparseCodes.load(a.usage_from)
            law, h = usage_law(measured), measured.dim
            used = np.diff(law[0], prepend=0) > 0
            print(f"latent law measured on {len(measured)} codes of {a.usage_from}: {used.sum()} of {h} latents used, "
                  f"the top 1% of latents hold {np.sort(np.diff(law[0], prepend=0))[::-1][: max(1, h // 100)].sum():.0%} of the values")
        else:
            law, h = zipf_law(a.hidden_dim, a.zipf, rng), a.hidden_dim
    print(f"faiss {faiss.__version__}, omp_get_max_threads() = {faiss.omp_get_max_threads()}; numpy {np.__version__}; "
          f"h={h} ks={ks} law={'measured' if a.usage_from else f'zipf s={a.zipf}'} metric={a.metric} top-{TOP_N}; "
          f"single: median of {a.single}, batch: {nq}")

    rows, ok, profile_case = [], True, None
    for size in sizes:
        for k in ks:
            if a.codes:
                db, qs = SparseCodes(real.indices[:size], real.values[:size], h), queries
            else:
                db, qs = drawn_codes(size, k, law, rng), drawn_codes(nq, k, law, rng)
            row, index, same = bench_sparse(db, qs, a)
            rows.append({"size": size, **row})
            print(f"  done {row['method']} n={size}", flush=True)
            if same is not None:
                print(f"check n={size} k={k}, {len(qs)} queries vs brute force: {'OK' if same else 'MISMATCH'}")
                ok &= bool(same)
            if size == max(sizes) and k == min(ks):
                profile_case = (index, qs)
        for d in (int(d) for d in a.dense_dims.split(",")):
            n = min(size, int(a.max_dense_bytes // (4 * d)))
            if n < size:
                print(f"dense {d}-d at n={size} needs {size * d * 4 / 1e9:.1f} GB > --max-dense-bytes: measured at n={n}")
            rows.append({"size": size, **bench_dense(n, d, f"MRL-{d}" if d <= 64 else f"dense-{d}", nq, a, rng)})
            print(f"  done {rows[-1]['method']} n={n}", flush=True)

    print(f"\n{'size':>9s} {'method':10s} {'n measured':>10s} {'build s':>8s} {'index MB':>9s} {'B/vec':>7s} "
          f"{'single ms':>10s} {'batch s':>8s} {'batch q/s':>10s} {'postings/q':>10s}")
    for r in rows:
        print(f"{r['size']:9d} {r['method']:10s} {r['n']:10d} {r['build_s']:8.3f} {r['bytes'] / 1e6:9.1f} "
              f"{r['bytes_per_vector']:7.2f} {r['single_ms']:10.3f} {r['batch_s']:8.3f} {nq / r['batch_s']:10.0f} "
              f"{r.get('postings_per_query', float('nan')):10.0f}")

    top, k0 = max(sizes), min(ks)
    ours = f"ours k={k0}"
    ratios = {"single_vs_dense_4096": ratio(rows, top, ours, "dense-4096", "single_ms"),
              "single_vs_mrl_32": ratio(rows, top, ours, "MRL-32", "single_ms"),
              "batch_vs_mrl_32": ratio(rows, top, ours, "MRL-32", "batch_s")}
    bpv = next(r["bytes_per_vector"] for r in rows if r["size"] == top and r["method"] == ours)
    print(f"\ntargets at database size {top}, k={k0}, h={h} (speed-up = baseline time / our time):")
    for name, r in ratios.items():
        if r:
            met = "met" if r["value"] >= TARGETS[name] else "NOT met"
            print(f"  {name:22s} {r['value']:10.2f}x  target >= {TARGETS[name]}x: {met}"
                  f"   (ours at n={r['n_ours']}, baseline at n={r['n_baseline']})")
    met = "met" if bpv <= TARGETS["bytes_per_vector_k2"] else "NOT met"
    print(f"  {'bytes_per_vector':22s} {bpv:10.2f}   target <= {TARGETS['bytes_per_vector_k2']}: {met} (offsets included)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")

    if a.profile and profile_case:
        index, qs = profile_case
        ones = [SparseCodes(qs.indices[i : i + 1], qs.values[i : i + 1], qs.dim) for i in range(a.single)]
        prof = cProfile.Profile()
        prof.runcall(lambda: [index.search(q, TOP_N) for q in ones])
        print(f"\ncProfile of {a.single} single queries, n={len(index)} k={k0} (tottime, top 15):")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
                       "queries": nq, "rows": rows, "ratios": ratios, "bytes_per_vector_k2": bpv,
                       "targets": TARGETS, "check_ok": ok}, f, indent=2)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
