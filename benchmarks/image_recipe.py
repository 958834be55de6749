"""What end-to-end training does to an image backbone, setting by setting, on a validation split (never the test split).

The data are `csrv2 reproduce`'s image subset (Fashion-MNIST by default: 2,000 train images at 64 px), of which the
suite's `--validation` holds out 20% (`held_out_rows`, seed 0): 1,600 train, 400 scored. Each run finetunes
EfficientNet-Lite0 for 3 epochs at batch 32 with `csrv2.finetune.Finetuner` (the paper's vision recipe for the head: lr
4e-4, AuxK weight 1/32) and scores 1-NN top-1 on the held-out images: the finetuned backbone's dense embeddings, their
first 2 and 32 dims (truncation), and for the csrv2 objective the k = 2 codes of the trained head. The csrv2 runs start
from a CSRv2-linear k = 2 head trained on the frozen embeddings of the same 1,600 images, as `csrv2 reproduce` does. The
first row is the frozen backbone, which no run may fall below.

    python benchmarks/image_recipe.py                          # every run below, one after the other
    python benchmarks/image_recipe.py --runs shipped,mrl --data digits --json out.json

Runs (name: objective, backbone lr, BatchNorm statistics, reconstruction target):
    bn-only:     matryoshka, lr 0, BatchNorm re-estimated: only the running statistics can change
    old:         csrv2, 2e-5, re-estimated, attached (the recipe texts use)
    frozen-bn:   csrv2, 2e-5, pretrained, attached
    detached:    csrv2, 2e-5, re-estimated, detached
    shipped:     csrv2, 2e-5, pretrained, detached (FinetuneConfig's image defaults)
    lr-1e-5, lr-5e-5: shipped at another backbone lr
    mrl-old:     matryoshka, 2e-5, re-estimated
    mrl:         matryoshka, 2e-5, pretrained (the shipped Matryoshka peer)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from csrv2.config import VISION_RECIPE, HeadConfig, TrainConfig, preset
from csrv2.data.backbones import ImageBackbone
from csrv2.data.datasets import load_dataset
from csrv2.data.training import TrainingData, class_ids
from csrv2.eval.baselines import truncate
from csrv2.eval.metrics import nearest_neighbour_accuracy
from csrv2.eval.tasks import held_out_rows
from csrv2.finetune import FINETUNE_EPOCHS, FinetuneConfig, Finetuner
from csrv2.head import encode
from csrv2.trainer import Trainer

K = 2
RUNS = {  # name -> (objective, backbone_lr, freeze_batchnorm, detach_target)
    "bn-only": ("matryoshka", 0.0, False, None),
    "old": ("csrv2", 2e-5, False, False),
    "frozen-bn": ("csrv2", 2e-5, True, False),
    "detached": ("csrv2", 2e-5, False, True),
    "shipped": ("csrv2", 2e-5, True, True),
    "lr-1e-5": ("csrv2", 1e-5, True, True),
    "lr-5e-5": ("csrv2", 5e-5, True, True),
    "mrl-old": ("matryoshka", 2e-5, False, None),
    "mrl": ("matryoshka", 2e-5, True, None),
}


def scores(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, head=None) -> dict:
    """1-NN top-1 of (n, d) train against (m, d) held-out embeddings: dense, first 2 and 32 dims, and the head's k = 2 codes."""
    out = {"dense": nearest_neighbour_accuracy(x_train, y_train, x_val, y_val)}
    for m in (2, 32):
        out[f"dims {m}"] = nearest_neighbour_accuracy(truncate(x_train, m), y_train, truncate(x_val, m), y_val)
    if head is not None:
        codes = [encode(head, x, K, progress=False).to_scipy() for x in (x_train, x_val)]
        out[f"k = {K}"] = nearest_neighbour_accuracy(codes[0], y_train, codes[1], y_val)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--json", metavar="OUT", help="also write the rows to this JSON file")
    a = p.parse_args()
    names = a.runs.split(",")
    if unknown := [n for n in names if n not in RUNS]:
        p.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    data = load_dataset(a.data, max_train=2000, max_test=1000, seed=0)
    train, val = held_out_rows(len(data.train_images))  # the suite's --validation split
    images = (data.train_images[train], data.train_images[val])  # (train, held-out)
    y_train, y_val = data.train_labels[train], data.train_labels[val]
    frozen = ImageBackbone(a.image_size)
    x_train, x_val = (frozen.embed(x, progress=False) for x in images)
    linear = Trainer(HeadConfig(frozen.dim, 0, K), preset("csrv2", **VISION_RECIPE), TrainingData(x_train, class_ids(y_train)),
                     progress=False).fit()  # CSRv2-linear as the suite trains it on images
    rows = [{"run": "frozen backbone, CSRv2-linear head", **scores(x_train, y_train, x_val, y_val, linear)}]
    print(f"{a.data}: {len(train)} train / {len(val)} held-out images at {a.image_size} px; 1-NN top-1 on the held-out ones")
    print(rows[0])
    for name in names:
        objective, backbone_lr, freeze, detach = RUNS[name]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            finetuner = Finetuner(
                ImageBackbone(a.image_size), images[0], y_train, k=K, out=f"{tmp}/model", progress=False,
                train=TrainConfig(epochs=FINETUNE_EPOCHS, batch_size=32, **VISION_RECIPE),
                finetune=FinetuneConfig(objective, backbone_lr, freeze_batchnorm=freeze, detach_target=detach),
                head=linear if objective == "csrv2" else None)
            backbone, head = finetuner.fit()
        x_t, x_v = (backbone.embed(x, progress=False) for x in images)
        rows.append({"run": name, **scores(x_t, y_train, x_v, y_val, head), "seconds": round(time.perf_counter() - start)})
        print(rows[-1], flush=True)
    columns = ["dense", "dims 2", "dims 32", f"k = {K}"]
    print("\n| run | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['run']} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in columns) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
