"""Training a sparse head on embeddings: the step, and the trainer that owns its state.

The run folder (`out`: the final model, config.json, model.safetensors and csrv2.json, with its log and
checkpoints while training), resume, locking and the stop on a non-finite loss are run.py's `Run`.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from . import kernels
from .config import HeadConfig, TrainConfig, preset, resolve_device, resolve_k_init
from .data.training import TrainingData, class_ids
from .errors import InputError
from .head import SparseHead
from .losses import (
    auxk_loss,
    pairs_contrastive_from_logits,
    reconstruction_loss,
    residual_spread,
    sparse_cosine_logits,
    supervised_contrastive_from_logits,
    total_loss,
)
from .model import load_head, save_head, write_head_files
from .run import Run, fingerprint
from .run import latest_checkpoint as latest_checkpoint  # where eval/suite.py finds it
from .schedule import k_at_step

LOSS_NAMES = ("loss", "loss_k", "loss_4k", "loss_aux", "loss_cl")


def step_losses(
    head: SparseHead,
    x: torch.Tensor,
    k: int,
    dead: torch.Tensor,
    cfg: TrainConfig,
    mode: str,
    labels: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The CSRv2 objective on one batch, with one encoder product.

    x: (n, input_dim), for mode "pairs" the queries then their documents (n/2 each); dead: (hidden_dim,)
    bool; labels: (n,) for mode "supervised". Returns the losses (0-dim tensors) and fired:
    (hidden_dim,) bool, the latents active in some top-k code.

    What keeps it cheap: the top-k and top-4k come from one top-4k of the pre-activations (topk is
    sorted, so its first k columns are the top-k); x_hat_4k = x_hat_k + the rows of latents
    k+1..4k, each code set decoded by gathering rows of W when it is small; AuxK reads only dead
    latents (on CPU it costs nothing when none is dead; on a GPU it never waits for the host) and
    never edits the pre-activations in place; the contrastive loss reads the single view of the
    codes, which the official recipe recomputes as an identical copy, and gathers its similarities.
    On CPUs with numba, selection, decoding and the whole backward of the head run compiled
    (kernels.py): autograd's dense products and zero-filled buffers cost more than the sparse
    work they hold there.
    """
    h = head.config.hidden_dim
    x_in, mu, std = head.standardize(x)
    compiled = kernels.available(x.device, head.weight.dtype)
    with torch.no_grad() if compiled else nullcontext():  # the compiled path builds the gradients itself
        pre = head.project(x_in)  # (n, h)
    if compiled:
        idx_4k = kernels.top_latents(pre, k, min(4 * k, h))  # (n, 4k), the top-k first
        val_k = pre.gather(1, idx_4k[:, :k])  # before the ReLU: read only for `fired`, replaced by z below
    else:
        top = pre.topk(min(4 * k, h), dim=1)
        idx_4k, val_4k = top.indices, top.values.relu()  # (n, 4k), largest first
        val_k = val_4k[:, :k]  # (n, k)
    idx_k = idx_4k[:, :k]  # (n, k)
    fired = torch.zeros(h, device=x.device).index_add_(0, idx_k.reshape(-1), (val_k > 0).reshape(-1).float()) > 0
    fired = dist.any_rank(fired)  # in the global batch, when it is split across processes
    # a latent that fires in this batch is not dead for it (as in the official recipe, whose
    # counters are updated by the top-k before AuxK reads them)
    dead = dead & ~fired
    if compiled:
        idx_aux = _dead_top(pre, dead, head.config.k_aux)  # (n, k_aux or fewer)
        z, sum_k, sum_rest, sum_aux = kernels.select(
            x_in, head.pre_bias, head.weight, head.latent_bias, pre, torch.cat([idx_4k, idx_aux], 1),
            (k, idx_4k.shape[1] - k, idx_aux.shape[1]))
        val_k = z[:, :k]
    else:
        sum_k, sum_rest = head.decode_sums([(idx_k, val_k), (idx_4k[:, k:], val_4k[:, k:])])  # (n, d) each
    x_hat_k = head.unstandardize(sum_k, std, mu)
    x_hat_4k = head.unstandardize(sum_k + sum_rest, std, mu)
    residual = x - x_hat_k.detach()
    if not compiled:
        loss_aux = _auxk(head, pre, dead, residual, std)
    elif idx_aux.shape[1]:
        loss_aux = _auxk_loss(head, sum_aux, residual, std, dead.any())
    else:
        loss_aux = torch.zeros((), device=x.device)
    losses = {
        "loss_k": reconstruction_loss(x, x_hat_k),
        "loss_4k": reconstruction_loss(x, x_hat_4k),
        "loss_aux": loss_aux,
        "loss_cl": _contrastive(idx_k, val_k, h, mode, labels, cfg.temperature),
    }
    losses["loss"] = total_loss(**losses, multi_k_coef=cfg.multi_k_coef, aux_coef=cfg.aux_coef, cl_coef=cfg.cl_coef)
    return losses, fired


def _auxk(head: SparseHead, pre: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor, std, read_count: bool | None = None) -> torch.Tensor:
    """AuxK from the dead latents' pre-activations. pre: (n, h); residual: (n, d), gradient already stopped.

    read_count (default: on CPU) lets the host read how many latents are dead and pick the cheaper
    path; on a GPU that read would stall the step until the device catches up, so both give one result.
    """
    h, k_aux = head.config.hidden_dim, head.config.k_aux
    if pre.device.type == "cpu" if read_count is None else read_count:
        dead_ids = dead.nonzero().squeeze(1)  # (n_dead,); with none dead the loss is 0 and costs nothing
        if len(dead_ids) == 0:
            return torch.zeros((), device=pre.device)
        if 2 * len(dead_ids) <= h:  # few dead: work on their columns only, a (n, n_dead) x (n_dead, d) product
            top = pre[:, dead_ids].topk(min(k_aux, len(dead_ids)), dim=1)
            z = torch.zeros(len(pre), len(dead_ids), dtype=pre.dtype, device=pre.device).scatter(1, top.indices, top.values.relu())
            return _auxk_loss(head, z @ head.weight[dead_ids], residual, std, dead.any())
    # Mask a copy of pre: live latents are -inf, so any of them the top k_aux still takes (fewer than k_aux
    # dead) is zeroed by the ReLU, and with none dead the loss is 0, all without reading the count.
    top = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=1, sorted=False)
    return _auxk_loss(head, head.decode_sums([(top.indices, top.values.relu())])[0], residual, std, dead.any())


def _dead_top(pre: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK's latents: per row of pre (n, h), the k_aux largest among the dead ones (all of them when fewer
    are dead) -> (n, min(k_aux, n_dead)) latent ids; reads the dead count, so for CPUs only."""
    dead_ids = dead.nonzero().squeeze(1)  # (n_dead,)
    count = min(k_aux, len(dead_ids))
    return kernels.top_latents(pre, count, count, dead_ids) if count else dead_ids.new_zeros(len(pre), 0)


def _auxk_loss(head: SparseHead, sums: torch.Tensor, residual: torch.Tensor, std, any_dead: torch.Tensor) -> torch.Tensor:
    """auxk_loss of the dead latents' W^T z_aux sums: (n, d); its normaliser over the global batch when
    the batch is split across processes (distributed.py)."""
    baseline = residual_spread(dist.sum_over_ranks(residual.sum(0)), dist.sum_over_ranks(residual.square().sum()), len(residual) * dist.world_size())
    return auxk_loss(residual, head.unstandardize(sums, std, bias=False), any_dead, baseline)


def _contrastive(idx: torch.Tensor, val: torch.Tensor, h: int, mode: str, labels, temperature: float) -> torch.Tensor:
    """The contrastive loss on the k-sparse codes (idx, val): (n, k); across processes, this rank's rows
    against the codes of the whole global batch (distributed.py), which travel as (n, k) pairs."""
    if mode == "none":
        return torch.zeros((), device=val.device)
    if mode == "pairs":
        (qi, di), (qv, dv) = idx.chunk(2), val.chunk(2)
    else:
        qi, di, qv, dv = idx, idx, val, val
    n, offset = len(qi), dist.rank() * len(qi)
    logits = sparse_cosine_logits(qi, qv, dist.gather_labels(di), dist.gather(dv), h, temperature)  # (n, world x n)
    if mode == "pairs":
        return pairs_contrastive_from_logits(logits, offset)
    if mode == "self":
        labels = torch.arange(n, device=val.device) + offset
    return supervised_contrastive_from_logits(logits, labels, dist.gather_labels(labels), offset)


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
    """The contrastive form the data allow: `auto` picks supervised, pairs or self; others are checked."""
    mode = cfg.contrastive
    if mode == "auto":
        return "supervised" if data.labels is not None else "pairs" if data.documents is not None else "self"
    if mode == "supervised" and data.labels is None:
        raise InputError("contrastive 'supervised' needs labels; pass --labels (or labels=) or choose another contrastive form")
    if mode == "pairs" and data.documents is None:
        raise InputError("contrastive 'pairs' needs documents; pass --documents (or documents=) or choose another contrastive form")
    if mode in ("self", "none") and data.documents is not None:
        raise InputError(f"contrastive {mode!r} does not use documents; drop them or use contrastive 'pairs'")
    return mode


class Objective(torch.nn.Module):
    """The head and its objective as one module, whose forward is `step_losses`: what DistributedDataParallel wraps."""

    def __init__(self, head: SparseHead, cfg: TrainConfig, mode: str) -> None:
        super().__init__()
        self.head, self.cfg, self.mode = head, cfg, mode

    def forward(self, x: torch.Tensor, k: int, dead: torch.Tensor, labels: torch.Tensor | None):
        return step_losses(self.head, x, k, dead, self.cfg, self.mode, labels)


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
        self.head_config, self.cfg, self.data = head_config, train_config, data
        self.mode = contrastive_mode(train_config, data)
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
