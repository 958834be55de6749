"""Training a sparse head on embeddings: the step, and the trainer that owns its state.

The run folder (`out`: the final model, config.json, model.safetensors and csrv2.json, with its log and
checkpoints while training), resume, locking and the stop on a non-finite loss are run.py's `Run`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .config import HeadConfig, TrainConfig, preset, resolve_device, resolve_k_init, resolve_temperature
from .data.training import TrainingData, class_ids
from .errors import InputError
from .head import SparseHead
from .model import load_head, save_head, write_head_files
from .objective import Objective
from .run import Run, fingerprint
from .run import latest_checkpoint as latest_checkpoint  # where eval/suite.py finds it
from .schedule import k_at_step

LOSS_NAMES = ("loss", "loss_k", "loss_4k", "loss_aux", "loss_cl")


@contextmanager
def tf32_matmuls(enabled: bool):
    """Inside the block, float32 matrix products on CUDA run on TF32 tensor cores if `enabled`, in full
    float32 if not; the caller's setting comes back after (a library must not change it for good)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32  # the legacy switch: the newer fp32_precision one breaks code that still reads this
    matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """(n,) the data order of one epoch, a function of (seed, epoch) alone, so a resumed run replays it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_embeddings(data: TrainingData, rows: np.ndarray, pairs: bool) -> np.ndarray:
    """(len(rows), d) float32 embeddings of sorted rows, then for pairs their documents: (2 len(rows), d)."""
    x = np.asarray(data.embeddings[rows], dtype=np.float32)
    return np.concatenate([x, np.asarray(data.documents[rows], dtype=np.float32)]) if pairs else x


def update_dead_counters(counters: torch.Tensor, fired: torch.Tensor) -> torch.Tensor:
    """Optimizer steps since each latent last fired: 0 where it fired this step, else one more."""
    return torch.where(fired, torch.zeros_like(counters), counters + 1)


def contrastive_mode(cfg: TrainConfig, data: TrainingData) -> str:
    """The contrastive form the data allow: `auto` picks supervised, pairs or self; `unlabelled` (CSR v1, which
    reads no labels) pairs or self, labels or not; others are checked."""
    mode = cfg.contrastive
    if mode == "auto" and data.labels is not None:
        return "supervised"
    if mode in ("auto", "unlabelled"):
        return "pairs" if data.documents is not None else "self"
    if mode == "supervised" and data.labels is None:
        raise InputError("contrastive 'supervised' needs labels; pass --labels (or labels=) or choose another contrastive form")
    if mode == "pairs" and data.documents is None:
        raise InputError("contrastive 'pairs' needs documents; pass --documents (or documents=) or choose another contrastive form")
    if mode in ("self", "none") and data.documents is not None:
        raise InputError(f"contrastive {mode!r} does not use documents; drop them or use contrastive 'pairs'")
    return mode


class Trainer:
    """Trains a `SparseHead` on `TrainingData`; owns the optimizer, the step, k and the dead-latent counters.

    The run's folder, resume, log, checkpoints and end are a `Run` (run.py). Under torchrun each rank
    trains on its shard of every global batch and DDP averages the gradients, which reproduces one
    process on the whole batch (distributed.py); only rank 0 logs and writes files.
    """

    def __init__(
        self,
        head_config: HeadConfig,
        train_config: TrainConfig,
        data: TrainingData,
        out: str | os.PathLike | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        if data.dim != head_config.input_dim:
            raise InputError(
                f"embeddings have {data.dim} dims but input_dim is {head_config.input_dim}; set input_dim to the embeddings' dimension"
            )
        self.mode = contrastive_mode(train_config, data)
        temperature = resolve_temperature(train_config.temperature, self.mode, head_config.k)  # None: by the contrastive form and k
        train_config = dataclasses.replace(train_config, temperature=temperature)
        self.head_config, self.cfg, self.data = head_config, train_config, data
        h, k = head_config.hidden_dim, head_config.k
        self.k_init = resolve_k_init(train_config.k_init, k, h) if train_config.anneal else k
        self.steps_per_epoch = math.ceil(len(data) / train_config.batch_size)
        self.total_steps = self.steps_per_epoch * train_config.epochs
        self.device = dist.init(resolve_device(train_config.device))
        dist.check_batch(train_config.batch_size)
        dist.same_everywhere((len(data), data.dim, self.mode), "data (rows, dims, contrastive form)")
        self.run = Run(out, self.total_steps, resume=resume, overwrite=overwrite, log_every=train_config.log_every,
                       checkpoint_every=train_config.checkpoint_every, progress=progress, desc="train")
        self.out = self.run.out

        generator = torch.Generator().manual_seed(train_config.seed)
        self.head = SparseHead(head_config, generator).to(self.device)
        self.objective = dist.wrap(Objective(self.head, train_config, self.mode), self.device)
        # The fused kernel does Adam's elementwise update in one pass (about 3x faster here on CPU).
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=train_config.lr, eps=train_config.adam_eps, fused=fused)
        self.step = 0
        self.counters = torch.zeros(h, dtype=torch.long, device=self.device)
        self.labels = None if data.labels is None else torch.from_numpy(data.labels)
        self._order: tuple[int, np.ndarray | None] = (-1, None)  # (epoch, its data order)

    # --- the loop, top to bottom -------------------------------------------------------------
    def fit(self) -> SparseHead:
        """Train to the last step (from the last checkpoint when resuming) and return the head."""
        with self.run as run:
            restored = run.begin(self.optimizer, self._settings(), {"counters": self.counters}, self._load_weights)
            if restored is not None:
                self.step, self.counters = restored["step"], restored["counters"].to(self.device)
            window = {name: torch.zeros((), device=self.device) for name in LOSS_NAMES}
            window_steps = 0
            while self.step < self.total_steps:
                epoch, position = divmod(self.step, self.steps_per_epoch)
                x, labels = self._batch(epoch, position)
                k = self.current_k()
                losses = self.train_step(x, labels, k)
                for name in LOSS_NAMES:
                    window[name] += losses[name].detach()
                window_steps += 1
                self.step += 1
                run.advance()
                if run.log_due(self.step):
                    self._log(window, window_steps, k, epoch)
                    window = {name: torch.zeros((), device=self.device) for name in LOSS_NAMES}
                    window_steps = 0
                if run.checkpoint_due(self.step, self.steps_per_epoch):
                    run.checkpoint(self.step, {"counters": self.counters}, lambda folder: write_head_files(self.head, folder))
            run.finish(self.step, lambda settings: save_head(self.head, self.out, settings))
        return self.head

    def current_k(self) -> int:
        return k_at_step(self.step, self.total_steps, self.k_init, self.head_config.k, self.cfg.decay_ratio)

    def train_step(self, x: torch.Tensor, labels: torch.Tensor | None, k: int) -> dict[str, torch.Tensor]:
        """One optimizer step at k, unless its loss is NaN or Inf (then the run stops); updates the dead-latent
        counters. x: (n, input_dim)."""
        dead = self.counters > self.head_config.dead_threshold
        with tf32_matmuls(self.cfg.tf32):
            losses, fired = self.objective(x, k, dead, labels)
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            self.run.watch(losses["loss"], self.step + 1)
            self.optimizer.step()
        self.counters = update_dead_counters(self.counters, fired)
        return losses

    def dead_fraction(self) -> float:
        return float((self.counters > self.head_config.dead_threshold).float().mean())

    # --- named steps ---------------------------------------------------------------------------
    def _batch(self, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of batch `position` of `epoch`; the order is a function of (seed, epoch) alone, so resuming replays it."""
        if self._order[0] != epoch:  # one permutation per epoch, drawn when the epoch starts
            self._order = (epoch, epoch_order(self.cfg.seed, epoch, len(self.data)))
        order = self._order[1]
        b = self.cfg.batch_size
        rows = dist.shard(np.sort(order[position * b : (position + 1) * b]))  # sorted: contiguous reads from a memory map
        x = batch_embeddings(self.data, rows, self.mode == "pairs")
        labels = None if self.labels is None else self.labels[rows].to(self.device)
        return torch.from_numpy(x).to(self.device), labels

    def _settings(self) -> dict:
        """What defines the run (run.py adds the version, step and steps): compared when resuming."""
        return {"train": self.cfg, "head": self.head_config, "k_init": self.k_init, "contrastive": self.mode, "samples": len(self.data),
                "data_fingerprint": fingerprint(self.data.embeddings, self.data.labels, self.data.documents)}

    def _load_weights(self, ckpt: Path) -> None:
        head = load_head(ckpt)
        if head.config != self.head_config:  # a checkpoint's settings may predate the head's entry
            raise InputError(f"{ckpt}: head config {head.config.to_dict()} differs from this run's {self.head_config.to_dict()}; "
                             "resume with the same options")
        self.head.load_state_dict(head.state_dict())

    def _log(self, window: dict[str, torch.Tensor], steps: int, k: int, epoch: int) -> dict:
        means = torch.stack([window[name] for name in LOSS_NAMES]).div(steps)
        means = (dist.sum_over_ranks(means) / dist.world_size()).tolist()  # the one sync per window
        record = {"step": self.step, "epoch": epoch, "k": k, **dict(zip(LOSS_NAMES, means, strict=True))}
        record["dead_pct"] = 100.0 * self.dead_fraction()
        self.run.log(record, loss=f"{record['loss']:.4g}", k=k, dead=f"{record['dead_pct']:.1f}%")
        return record



def train(
    embeddings: np.ndarray | TrainingData,
    labels: np.ndarray | None = None,
    documents: np.ndarray | None = None,
    *,
    k: int = 8,
    hidden_dim: int = 0,
    k_aux: int = 0,
    dead_threshold: int = 30,
    normalize: bool = False,
    preset_name: str = "csrv2",
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **overrides,
) -> SparseHead:
    """Train a sparse head on (n, d) embeddings and return it; the Python face of `csrv2 train`.

    labels: (n,) switch the csrv2 preset to the supervised contrastive loss; documents: (n, d) rows
    paired with `embeddings` (queries) switch it to the pairs loss. `overrides` are `TrainConfig` fields.
    """
    data = embeddings if isinstance(embeddings, TrainingData) else TrainingData(
        np.asarray(embeddings),  # a memory map stays one (no copy)
        None if labels is None else class_ids(labels),
        None if documents is None else np.asarray(documents),
    )
    head_config = HeadConfig(data.dim, hidden_dim, k, k_aux, normalize, dead_threshold)
    trainer = Trainer(head_config, preset(preset_name, **overrides), data, out, resume=resume, overwrite=overwrite, progress=progress)
    return trainer.fit()
