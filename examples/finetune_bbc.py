"""End-to-end CSRv2 ("full") against head-only CSRv2-linear at k = 2 on BBC News, on a CPU.

Both start from the packaged all-MiniLM-L6-v2 (texts cut to 128 tokens) and the split of
`csrv2 reproduce` (seeded, 1,778 train / 447 test articles). Full: backbone + head trained together
with `csrv2.finetune.finetune_text`; linear: a head on the frozen embeddings. Scored like the suite:
logistic-regression and 1-NN accuracy of the k-sparse test codes. Writes the full model as a
sentence-transformers SparseEncoder folder.

    python examples/finetune_bbc.py [--epochs 3] [--batch-size 32] [--out runs/bbc-full]
"""

from __future__ import annotations

import argparse
import time

import csrv2
from csrv2.config import TrainConfig
from csrv2.data.backbones import TextBackbone
from csrv2.data.cache import EmbeddingCache
from csrv2.data.datasets import load_bbc_news
from csrv2.eval.metrics import logistic_regression_accuracy, nearest_neighbour_accuracy
from csrv2.finetune import FinetuneConfig, finetune_text


def scores(backbone: TextBackbone, head, data, embed) -> tuple[float, float]:
    train = csrv2.encode(head, embed(backbone, data.train_texts), progress=False).to_scipy()
    test = csrv2.encode(head, embed(backbone, data.test_texts), progress=False).to_scipy()
    return (logistic_regression_accuracy(train, data.train_labels, test, data.test_labels),
            nearest_neighbour_accuracy(train, data.train_labels, test, data.test_labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="runs/bbc-full")
    args = parser.parse_args()
    data = load_bbc_news(max_train=2000, max_test=1000)
    cache = EmbeddingCache()
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size)

    frozen = TextBackbone(max_seq_length=128)
    x = cache.get(frozen, data.train_texts)
    linear = csrv2.train(x, data.train_labels, k=args.k, **{f: getattr(cfg, f) for f in ("epochs", "batch_size")}, progress=False)
    linear_scores = scores(frozen, linear, data, lambda b, t: cache.get(b, t, progress=False))

    start = time.perf_counter()
    full_backbone, full_head = finetune_text(TextBackbone(max_seq_length=128), data.train_texts, data.train_labels, k=args.k,
                                             train=cfg, finetune=FinetuneConfig(), out=args.out, overwrite=True)
    minutes = (time.perf_counter() - start) / 60
    full_scores = scores(full_backbone, full_head, data, lambda b, t: b.embed(t, progress=False))

    print(f"\nBBC News, k = {args.k}, {args.epochs} epochs at batch {args.batch_size} for both "
          f"({len(data.train_texts)} train / {len(data.test_texts)} test; end-to-end took {minutes:.1f} min)")
    print("| method | logistic regression | 1-NN |\n|---|---|---|")
    for name, (lr, nn) in (("CSRv2-linear (head only)", linear_scores), ("CSRv2 (backbone + head)", full_scores)):
        print(f"| {name} | {lr:.3f} | {nn:.3f} |")
    print(f"wrote {args.out} (sentence-transformers SparseEncoder)")


if __name__ == "__main__":
    main()
