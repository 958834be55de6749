"""End-to-end CSRv2 on texts: the backbone and the sparse head trained together ("CSRv2" in PAPER.md).

Each step embeds a batch of texts with the backbone (gradients on), then applies the CSRv2 objective
of the head-only trainer to those embeddings: reconstruction of the backbone's current embedding at
k and 4k, AuxK, and the contrastive loss on the k-sparse codes (supervised with labels, pairs with
query/document pairs), with k annealed per optimizer step. The gradient reaches the backbone through
both the head's input and the reconstruction target. One Adam optimizer, two learning rates.

Not yet here: LoRA, checkpoints and resume, images. The result is written in the sentence-transformers
SparseEncoder format (export.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import TextBackbone
from .config import HeadConfig, TrainConfig, resolve_device, resolve_k_init
from .data import class_ids
from .errors import InputError
from .export import export_sparse_encoder
from .head import SparseHead
from .schedule import k_at_step
from .trainer import epoch_order, step_losses, update_dead_counters


@dataclass(frozen=True)
class FinetuneConfig:
    """What end-to-end training adds to `TrainConfig` (whose lr is the head's)."""

    backbone_lr: float = 2e-5
    """Adam learning rate of the backbone's parameters."""
    grad_accum: int = 1
    """Batches whose gradients add up before each optimizer step (the step sees batch_size x grad_accum texts)."""
    bf16: bool = True
    """bf16 autocast of the forward pass on a CUDA device; CPU runs in float32 whatever this says."""

    def __post_init__(self) -> None:
        if self.backbone_lr < 0 or self.grad_accum < 1:
            raise ValueError(f"backbone_lr must be >= 0 and grad_accum >= 1, got {self.backbone_lr} and {self.grad_accum}")


def finetune_text(
    backbone: TextBackbone,
    texts: list[str],
    labels: np.ndarray | None = None,
    documents: list[str] | None = None,
    *,
    k: int = 2,
    hidden_dim: int = 0,
    train: TrainConfig | None = None,
    finetune: FinetuneConfig | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[TextBackbone, SparseHead]:
    """Train backbone + head on texts (labels: (n,) for the supervised loss; documents: n texts paired
    with `texts` as queries for the pairs loss); returns both, and writes a SparseEncoder folder to `out`."""
    cfg, ft = train or TrainConfig(), finetune or FinetuneConfig()
    if not texts:
        raise InputError("no texts to train on; pass at least one")
    if labels is not None and documents is not None:
        raise InputError("give labels or documents, not both: labels train the supervised loss, documents the pairs loss")
    for name, other in (("labels", labels), ("documents", documents)):
        if other is not None and len(other) != len(texts):
            raise InputError(f"{len(other)} {name} for {len(texts)} texts; pass one per text")
    if out is not None and Path(out).exists() and not overwrite:
        raise InputError(f"{out}: already exists; choose another folder or pass --overwrite")  # before hours of training
    mode = "supervised" if labels is not None else "pairs" if documents is not None else "self"
    ids = None if labels is None else torch.from_numpy(class_ids(np.asarray(labels)))

    device = resolve_device(cfg.device)
    model = backbone.model.to(device).train()
    head_config = HeadConfig(backbone.dim, hidden_dim, k)
    head = SparseHead(head_config, torch.Generator().manual_seed(cfg.seed)).to(device)
    optimizer = torch.optim.Adam(
        [{"params": model.parameters(), "lr": ft.backbone_lr}, {"params": head.parameters(), "lr": cfg.lr}], eps=cfg.adam_eps
    )
    per_step = cfg.batch_size * ft.grad_accum
    steps_per_epoch = math.ceil(len(texts) / per_step)
    total = steps_per_epoch * cfg.epochs
    k_init = resolve_k_init(cfg.k_init, k, head_config.hidden_dim) if cfg.anneal else k
    counters = torch.zeros(head_config.hidden_dim, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and ft.bf16)
    torch.manual_seed(cfg.seed)  # dropout in the backbone

    prepare = getattr(model, "preprocess", None) or model.tokenize  # renamed in sentence-transformers 6
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not progress)
    for step in range(total):
        epoch, position = divmod(step, steps_per_epoch)
        if position == 0:  # one order per epoch, the head-only trainer's
            order = epoch_order(cfg.seed, epoch, len(texts))
        rows = order[position * per_step : (position + 1) * per_step]
        k_t = k_at_step(step, total, k_init, k, cfg.decay_ratio)
        dead = counters > head_config.dead_threshold
        fired = torch.zeros_like(dead)
        optimizer.zero_grad(set_to_none=True)
        for micro in np.array_split(rows, math.ceil(len(rows) / cfg.batch_size)):
            batch = [texts[i] for i in micro] + ([documents[i] for i in micro] if mode == "pairs" else [])
            features = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in prepare(batch).items()}
            with autocast:
                x = model(features)["sentence_embedding"].float()  # (n, d), or (2n, d) queries then documents
                losses, fired_now = step_losses(head, x, k_t, dead, cfg, mode, None if ids is None else ids[micro].to(device))
            (losses["loss"] * len(micro) / len(rows)).backward()  # the mean over the whole step's texts
            fired |= fired_now
        optimizer.step()
        counters = update_dead_counters(counters, fired)
        bar.update(1)
        bar.set_postfix(loss=f"{losses['loss'].item():.4g}", k=k_t, dead=f"{100 * float(dead.float().mean()):.1f}%")
    bar.close()
    model.eval()
    head.eval()
    trained = TextBackbone.from_model(model, f"{backbone.name} (finetuned with csrv2)")
    if out is not None:
        settings = {"train": dataclasses.asdict(cfg), "finetune": dataclasses.asdict(ft), "backbone": backbone.name, "k_init": k_init,
                    "contrastive": mode, "samples": len(texts), "total_steps": total}
        export_sparse_encoder(head, out, trained, settings=settings, overwrite=overwrite)
    return trained, head


__all__ = ["FinetuneConfig", "finetune_text"]
