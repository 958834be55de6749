"""Batch search on one device: k-sparse codes (csrv2's torch index) against dense and MRL flat search.

What is measured, on the same device in the same run, for a batch of queries (default 512) and
top-10 selection included, median over repeats with the device synchronised around each batch:
  ours   TorchIndex.search_tensors: one sparse (n, h) x dense (h, q) product + topk over n per query;
  dense  flat inner product of fp16 (n, d) vectors, d = 4096 by default: one GEMM + topk;
  MRL    the same at the truncated widths (2 ... 64), each on its own (n, m) fp16 matrix.
Database codes are synthetic with skewed latent usage, as a trained head's are (uniform usage would
make every posting list short): latent j is drawn with p_j ∝ 1 / (j + 10)^zipf, distinct within a
code; values |N(0, 1)| + 0.1. Queries are drawn the same way. Before timing, our top-10 is checked
against the exact numpy index on a few queries (same scores; ids may differ only within ties).

    python benchmarks/search_gpu.py --device cuda                  # 1M codes, h = 16384, k = 2 and 8
    python benchmarks/search_gpu.py --device cpu --n 20000         # a quick run without a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from csrv2 import InvertedIndex, SparseCodes
from csrv2.search.torch_index import TorchIndex


def skewed_codes(n: int, dim: int, k: int, zipf: float, rng: np.random.Generator) -> SparseCodes:
    """(n, k) codes whose latents follow p_j ∝ 1 / (j + 10)^zipf, distinct within each row."""
    p = 1.0 / (np.arange(dim) + 10.0) ** zipf
    p /= p.sum()
    indices = rng.choice(dim, size=(n, k), p=p)
    while True:  # redraw the rows that picked a latent twice (few, as long as k is small)
        s = np.sort(indices, axis=1)
        bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not bad.any():
            break
        indices[bad] = rng.choice(dim, size=(int(bad.sum()), k), p=p)
    values = (np.abs(rng.standard_normal((n, k))) + 0.1).astype(np.float32)
    return SparseCodes(indices.astype(np.int32), values, dim)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type != "cpu":
            torch.accelerator.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type != "cpu":
            torch.accelerator.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flat_search(n: int, d: int, queries: int, top_n: int, device: torch.device):
    """A closure that runs one flat inner-product batch search over random unit fp16 (n, d) vectors.

    The vectors are drawn on the device (seeded by torch.manual_seed): 1M x 4096 would take minutes on a host.
    """
    dtype = torch.float16 if device.type != "cpu" else torch.float32  # CPU matmul in fp16 is not a fair baseline
    x = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1).to(dtype)
    q = torch.nn.functional.normalize(torch.randn(queries, d, device=device), dim=1).to(dtype)
    return lambda: (q @ x.T).topk(top_n, dim=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    p.add_argument("--hidden-dim", type=int, default=16384)
    p.add_argument("--ks", default="2,8", help="non-zeros per code, comma-separated")
    p.add_argument("--queries", type=int, default=512, help="queries per batch")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--dense-dim", type=int, default=4096, help="width of the dense baseline")
    p.add_argument("--mrl-dims", default="2,4,8,16,32,64", help="MRL truncation widths")
    p.add_argument("--zipf", type=float, default=1.0, help="skew of latent usage")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the numbers here")
    a = p.parse_args(argv)
    device, rng = torch.device(a.device), np.random.default_rng(a.seed)
    torch.manual_seed(a.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"n={a.n} h={a.hidden_dim} queries={a.queries} top_n={a.top_n} device={name} torch={torch.__version__}")

    rows = []
    for k in map(int, a.ks.split(",")):
        codes, queries = skewed_codes(a.n, a.hidden_dim, k, a.zipf, rng), skewed_codes(a.queries, a.hidden_dim, k, a.zipf, rng)
        start = time.perf_counter()
        index = InvertedIndex.build(codes, "ip")
        built = time.perf_counter() - start
        start = time.perf_counter()
        on_device = TorchIndex(index, device)
        moved = time.perf_counter() - start
        ids, scores = on_device.search(queries, a.top_n)
        want_ids, want_scores = index.search(SparseCodes(queries.indices[:8], queries.values[:8], queries.dim), a.top_n)
        ok = np.allclose(scores[:8], want_scores, rtol=1e-4) and ((ids[:8] >= 0) == (want_ids >= 0)).all()
        print(f"k={k}: exact-index check on 8 queries {'OK' if ok else 'MISMATCH'}; build {built:.2f} s, to device {moved:.2f} s, "
              f"mean posting list {len(index.ids) / max(1, (np.diff(index.offsets) > 0).sum()):.0f}, "
              f"longest {np.diff(index.offsets).max()}")
        if not ok:
            raise SystemExit(1)
        seconds = timed(lambda idx=on_device, q=queries: idx.search_tensors(q, a.top_n), device, a.repeats)
        rows.append((f"csrv2 k={k} (h={a.hidden_dim})", seconds, index.nbytes / a.n))

    flat = {f"dense {a.dense_dim}-d": a.dense_dim, **{f"MRL-{m}": m for m in map(int, a.mrl_dims.split(","))}}
    for label, d in flat.items():
        seconds = timed(flat_search(a.n, d, a.queries, a.top_n, device), device, a.repeats)
        rows.append((label, seconds, d * (2 if device.type != "cpu" else 4)))
        torch.cuda.empty_cache() if device.type == "cuda" else None

    print(f"\n{'method':28s}{'ms / batch':>12s}{'queries/s':>14s}{'bytes/vector':>14s}")
    for label, seconds, nbytes in rows:
        print(f"{label:28s}{1e3 * seconds:12.3f}{a.queries / seconds:14.0f}{nbytes:14.1f}")
    times = {label: seconds for label, seconds, _ in rows}
    for k in map(int, a.ks.split(",")):
        ours = times[f"csrv2 k={k} (h={a.hidden_dim})"]
        ratios = ", ".join(f"{label} {times[label] / ours:.2f}x" for label in flat)
        print(f"k={k} speed-up over: {ratios}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "device": name, "torch": torch.__version__, "seconds_per_batch": times}, f, indent=2)


if __name__ == "__main__":
    main()
