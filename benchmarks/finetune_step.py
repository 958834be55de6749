"""Time end-to-end CSRv2 training (backbone + head) on a device: samples/s and peak memory.

Texts are BBC News articles (packaged), cut to --max-seq-length tokens, with their labels, so the
supervised loss runs as in training. One untimed warm-up run of --warmup steps, then --steps timed
optimizer steps at --batch-size (no export, no checkpoint). On CUDA the forward pass runs under bf16
autocast unless --no-bf16; peak memory is torch.cuda.max_memory_allocated, on CPU the process's peak RSS.

    python benchmarks/finetune_step.py --device cuda --batch-size 64 --steps 50      # the GPU figure of docs/benchmarks.md
    python benchmarks/finetune_step.py --device cpu --batch-size 16 --steps 3        # a smoke run here
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from csrv2.config import TrainConfig, resolve_device
from csrv2.data.backbones import TextBackbone
from csrv2.data.datasets import load_bbc_news
from csrv2.finetune import FinetuneConfig, finetune_text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of every parameter")
    p.add_argument("--json", metavar="OUT")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    data = load_bbc_news()
    n = a.batch_size * a.steps
    texts = (data.train_texts * (n // len(data.train_texts) + 1))[:n]
    labels = (list(data.train_labels) * (n // len(data.train_labels) + 1))[:n]
    ft = FinetuneConfig(bf16=not a.no_bf16, lora_rank=a.lora_rank)

    def run(count: int) -> float:
        backbone = TextBackbone(device=str(device), max_seq_length=a.max_seq_length)
        _ = backbone.model  # loaded before the clock starts
        cfg = TrainConfig(epochs=1, batch_size=a.batch_size, device=str(device))
        start = time.perf_counter()
        rows = count * a.batch_size
        finetune_text(backbone, texts[:rows], labels[:rows], k=a.k, train=cfg, finetune=ft, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(a.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = run(a.steps)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "batch_size": a.batch_size, "steps": a.steps,
              "max_seq_length": a.max_seq_length, "bf16": device.type == "cuda" and ft.bf16, "lora_rank": a.lora_rank, "seconds": seconds,
              "samples_per_s": a.batch_size * a.steps / seconds, "peak_memory_gib": peak}
    print(f"{name}, torch {torch.__version__}: all-MiniLM-L6-v2 + head (k = {a.k}), batch {a.batch_size}, "
          f"{a.max_seq_length} tokens, bf16 {result['bf16']}: {result['samples_per_s']:.1f} samples/s over {a.steps} steps, "
          f"peak memory {peak:.2f} GiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
