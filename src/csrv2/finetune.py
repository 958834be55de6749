"""End-to-end training: a backbone trained together with its objective, for texts and images.

Two objectives, one loop, one budget:
  csrv2       "CSRv2" of the paper: backbone + TopK head. Each step embeds a batch with the backbone
              (gradients on) and applies the head-only trainer's objective to those embeddings:
              reconstruction of the backbone's current embedding at k and 4k, AuxK, and the
              contrastive loss on the k-sparse codes (supervised with labels, pairs with
              query/document pairs, else self), with k annealed per optimizer step. The gradient
              reaches the backbone through the head's input, and for texts through the reconstruction
              target too (`detach_target`: an image backbone's unnormalised features would shrink).
  matryoshka  MRL as a finetuned peer: the backbone alone, trained so that every prefix of its
              embedding (dims 2..64) is an embedding of its own: the mean over prefixes of the same
              contrastive loss on cosine similarity (objective.matryoshka_loss).
One Adam optimizer with two learning rates (backbone, head). Texts train full-parameter or through
LoRA adapters (peft), merged into the weights at the end; images (EfficientNet-Lite0) full-parameter,
with BatchNorm on its pretrained statistics (`freeze_batchnorm`).

The run folder `out` (run.py) holds, while training, `train_log.jsonl` and `checkpoints/step-N/`
(backbone.safetensors, the head's files, state.pt with optimizer, step, dead-latent counters and
RNG, read with weights_only=True); `resume` continues from the newest. At the end `out` is replaced,
whole, by the model (with the log):
  texts, csrv2        a sentence-transformers SparseEncoder folder (export.py)
  texts, matryoshka   a SentenceTransformer folder; truncate its embeddings to any trained dim
  images              backbone.safetensors (+ the head's config.json and model.safetensors for csrv2)
Every model folder has csrv2.json with the settings of the run; `read_image_model` reads image ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from . import distributed as dist
from .atomic import write_folder, write_json
from .config import (
    MRL_DIMS,
    HeadConfig,
    TrainConfig,
    check_bool,
    check_finite,
    check_int,
    resolve_device,
    resolve_k_init,
    resolve_temperature,
)
from .data.backbones import ImageBackbone, TextBackbone
from .data.training import class_ids
from .errors import InputError
from .export import to_sparse_encoder
from .head import SparseHead
from .model import SETTINGS_FILE, load_head, read_settings, write_head_files
from .objective import matryoshka_loss, step_losses
from .run import LOG_FILE, Run, fingerprint
from .schedule import k_at_step
from .trainer import (
    epoch_order,
    tf32_matmuls,
    update_dead_counters,
)

BACKBONE_WEIGHTS = "backbone.safetensors"
OBJECTIVES = ("csrv2", "matryoshka")
DEFAULT_K = 2  # end to end aims at the smallest codes; the head-only default stays HeadConfig's
# End to end trains the backbone too, a backbone pass per batch: its own few epochs (those of the BBC example,
# docs/benchmarks.md), not TrainConfig's head-only default.
FINETUNE_EPOCHS = 3


@dataclass(frozen=True)
class FinetuneConfig:
    """What end-to-end training adds to `TrainConfig` (whose lr is the head's)."""

    objective: Literal["csrv2", "matryoshka"] = "csrv2"
    """csrv2: backbone + sparse head (CSRv2 full); matryoshka: the backbone alone with nested-prefix losses (a finetuned MRL)."""
    backbone_lr: float = 2e-5
    """Adam learning rate of the backbone's parameters (of its LoRA adapters with lora_rank > 0)."""
    grad_accum: int = 1
    """Batches whose gradients add up before each optimizer step (the step sees batch_size x grad_accum items)."""
    bf16: bool = True
    """bf16 autocast of the forward pass on a CUDA device; CPU runs in float32 whatever this says."""
    lora_rank: int = 0
    """0: train every backbone parameter; r > 0: train rank-r LoRA adapters on the attention projections instead (texts; needs peft)."""
    lora_alpha: float = 0.0
    """LoRA scale numerator (0 = 2 x lora_rank)."""
    mrl_dims: tuple[int, ...] = MRL_DIMS
    """Nested prefix sizes of the matryoshka objective."""
    freeze_batchnorm: bool = True
    """Keep BatchNorm layers on their pretrained running statistics while their scale and shift train (images; texts have
    none): re-estimated from small batches of a new domain, they no longer fit the weights (Fashion-MNIST, backbone lr 0:
    EfficientNet-Lite0's dense 1-NN fell from 0.77 to 0.67 on the validation split)."""
    detach_target: bool | None = None
    """Stop the gradient through the reconstruction target, the backbone's own embedding, so that the backbone learns
    through the head's input alone and cannot lower the reconstruction error by shrinking its features. None: on for
    images (unnormalised features that collapsed without it), off for texts (unit-norm MiniLM, the recipe measured there)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        check_int("grad_accum", self.grad_accum, 1)
        check_int("lora_rank", self.lora_rank, 0)
        check_bool("bf16", self.bf16)
        check_bool("freeze_batchnorm", self.freeze_batchnorm)
        if self.detach_target is not None:
            check_bool("detach_target", self.detach_target)
        for name in ("backbone_lr", "lora_alpha"):
            check_finite(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for dim in self.mrl_dims:
            check_int("each of mrl_dims", dim, 1)
        if not self.mrl_dims or list(self.mrl_dims) != sorted(set(self.mrl_dims)):
            raise ValueError(f"mrl_dims must be increasing positive sizes, got {self.mrl_dims}")


def _add_lora(model, rank: int, alpha: float):
    """Wrap the transformer of a SentenceTransformer in peft LoRA adapters (the rest of it frozen); returns the peft model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise InputError("LoRA needs peft: pip install 'csrv2[lora]', or train every parameter with lora_rank 0") from e
    transformer = model[0]
    try:  # target modules: peft's defaults for the architecture (query and value for BERT)
        transformer.model = get_peft_model(transformer.model, LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0))
    except ValueError as e:
        raise InputError(f"peft has no default LoRA targets for this backbone ({e}); train it with lora_rank 0") from e
    return transformer.model


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Put every BatchNorm layer of a model in training mode back in eval mode: it normalises with its running
    statistics and stops updating them, while its affine weights still train."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


class EndToEnd(torch.nn.Module):
    """Backbone, head (None for the matryoshka objective) and objective as one module: what DistributedDataParallel wraps."""

    def __init__(self, backbone: TextBackbone | ImageBackbone, head: SparseHead | None, cfg: TrainConfig, ft: FinetuneConfig, mode: str):
        super().__init__()
        self.model, self.head = backbone.model, head
        self.backbone, self.cfg, self.ft, self.mode = backbone, cfg, ft, mode

    def forward(self, batch, k: int | None, dead: torch.Tensor | None, labels: torch.Tensor | None):
        """batch: texts (queries then documents for pairs) or images -> (loss, fired latents or None)."""
        x = self.backbone.forward(batch).float()  # (n, d), or (2n, d)
        # The head and the losses leave bf16 autocast: top-k selection and the sparse decoding need
        # float32 (TF32 products on CUDA), and embedding_bag refuses bf16 codes against float32 weights.
        with torch.autocast(x.device.type, enabled=False):
            if self.head is None:
                return matryoshka_loss(x, self.ft.mrl_dims, self.mode, labels, self.cfg.temperature), None
            target = x.detach() if self.ft.detach_target else None
            losses, fired = step_losses(self.head, x, k, dead, self.cfg, self.mode, labels, target=target)
        return losses["loss"], fired


class Finetuner:
    """Trains a backbone (and a sparse head for the csrv2 objective) end to end; owns the loop and the final folder.

    items: n texts or (n, H, W[, 3]) images; labels: (n,) for the supervised loss; documents: n texts
    paired with `items` as queries, for the pairs loss. The run's folder, resume, log and checkpoints
    are a `Run` (run.py). Under torchrun each rank takes its shard of every global batch and DDP
    averages the gradients (distributed.py); only rank 0 logs and writes files. BatchNorm statistics
    (images) stay the pretrained ones unless `freeze_batchnorm` is off; then each rank keeps its own.
    """

    def __init__(
        self,
        backbone: TextBackbone | ImageBackbone,
        items,
        labels: np.ndarray | None = None,
        documents: list[str] | None = None,
        *,
        k: int = DEFAULT_K,
        hidden_dim: int = 0,
        train: TrainConfig | None = None,
        finetune: FinetuneConfig | None = None,
        out: str | os.PathLike | None = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        head: SparseHead | None = None,
    ) -> None:
        """train: the head's recipe (default: TrainConfig's, for FINETUNE_EPOCHS epochs); head: start from this
        trained head (e.g. CSRv2-linear's on the frozen embeddings; its k and shape are kept, and k is not annealed
        again) instead of a random one."""
        self.cfg, self.ft = train or TrainConfig(epochs=FINETUNE_EPOCHS), finetune or FinetuneConfig()
        self.text = isinstance(backbone, TextBackbone)
        if self.ft.detach_target is None:
            self.ft = dataclasses.replace(self.ft, detach_target=not self.text)
        if len(items) == 0:
            raise InputError("no items to train on; pass at least one text or image")
        if labels is not None and documents is not None:
            raise InputError("give labels or documents, not both: labels train the supervised loss, documents the pairs loss")
        for name, other in (("labels", labels), ("documents", documents)):
            if other is not None and len(other) != len(items):
                raise InputError(f"{len(other)} {name} for {len(items)} items; pass one per item")
        if not self.text and (documents is not None or self.ft.lora_rank):
            raise InputError("image training takes labels (or nothing) and trains every parameter; drop documents and lora_rank")
        self.per_step = self.cfg.batch_size * self.ft.grad_accum
        self.steps_per_epoch = math.ceil(len(items) / self.per_step)
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        # The model replaces the whole folder at the end; its checks come before hours of training.
        self.run = Run(out, self.total_steps, resume=resume, overwrite=overwrite, replaces_folder=True, log_every=self.cfg.log_every,
                       checkpoint_every=self.cfg.checkpoint_every, progress=progress, desc="finetune")
        self.out = self.run.out
        self.backbone, self.items, self.documents = backbone, items, documents
        self.mode = "supervised" if labels is not None else "pairs" if documents is not None else "self"
        self.labels = None if labels is None else torch.from_numpy(class_ids(np.asarray(labels)))

        self.device = dist.init(resolve_device(self.cfg.device))
        dist.check_batch(self.cfg.batch_size)
        dist.same_everywhere((len(items), self.mode), "data (items, contrastive form)")
        self.model = backbone.model.to(self.device)
        self.peft = _add_lora(self.model, self.ft.lora_rank, self.ft.lora_alpha) if self.ft.lora_rank else None
        self.head, self.started_from_head = None, head is not None
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.ft.backbone_lr}]
        if head is not None and (self.ft.objective != "csrv2" or head.config.input_dim != backbone.dim):
            raise InputError(f"a starting head needs the csrv2 objective and {backbone.dim}-d inputs, "
                             f"got a {head.config.input_dim}-d head; pass a head trained on this backbone's embeddings")
        self.counters = None
        if self.ft.objective == "csrv2":
            self.head_config = head.config if head is not None else HeadConfig(backbone.dim, hidden_dim, k)
            self.head = SparseHead(self.head_config, torch.Generator().manual_seed(self.cfg.seed)).to(self.device)
            if head is not None:
                self.head.load_state_dict(head.state_dict())
            groups.append({"params": list(self.head.parameters()), "lr": self.cfg.lr})
            annealed = self.cfg.anneal and head is None
            h = self.head_config.hidden_dim
            self.k_init = resolve_k_init(self.cfg.k_init, self.head_config.k, h) if annealed else self.head_config.k
            self.counters = torch.zeros(h, dtype=torch.long, device=self.device)
        elif max(self.ft.mrl_dims) > backbone.dim:
            raise InputError(f"mrl_dims go up to {max(self.ft.mrl_dims)} but the backbone makes {backbone.dim}-d embeddings; "
                             "pass smaller dims")
        # the sparse head's temperature follows its k; the Matryoshka peer's is a dense model's
        k = self.head_config.k if self.ft.objective == "csrv2" else None
        self.cfg = dataclasses.replace(self.cfg, temperature=resolve_temperature(self.cfg.temperature, self.mode, k))
        # find_unused_parameters: a backbone may hold weights its embedding does not use (BERT's pooler)
        self.objective = dist.wrap(EndToEnd(backbone, self.head, self.cfg, self.ft, self.mode), self.device, find_unused_parameters=True)
        self.optimizer = torch.optim.Adam(groups, eps=self.cfg.adam_eps)
        self.step = 0
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.ft.bf16)

    # --- the loop, top to bottom -------------------------------------------------------------
    def fit(self) -> tuple[TextBackbone | ImageBackbone, SparseHead | None]:
        """Train to the last step (from the newest checkpoint when resuming); returns the trained backbone and head."""
        torch.manual_seed(self.cfg.seed)  # dropout and drop-connect in the backbone
        with self.run as run:
            restored = run.begin(self.optimizer, self._settings(), self._tensors(), self._load_weights)
            if restored is not None:
                self.step = restored["step"]
                if self.head is not None:
                    self.counters = restored["counters"].to(self.device)
            self.model.train()
            if self.ft.freeze_batchnorm:
                freeze_batchnorm(self.model)
            while self.step < self.total_steps:
                epoch, position = divmod(self.step, self.steps_per_epoch)
                rows = epoch_order(self.cfg.seed, epoch, len(self.items))[position * self.per_step : (position + 1) * self.per_step]
                k = self.current_k()
                loss = self.train_step(rows, k)
                self.step += 1
                run.advance()
                if run.log_due(self.step):
                    self._log(loss, k, epoch)
                if run.checkpoint_due(self.step, self.steps_per_epoch):
                    run.checkpoint(self.step, self._tensors(), self._write_weights)
            trained = self._trained_backbone()
            run.finish(self.step, lambda settings: self._write_model(trained, settings))
        return trained, self.head

    def dead_fraction(self) -> float:
        """Share of the head's latents dead now (csrv2 objective)."""
        return float((self.counters > self.head_config.dead_threshold).float().mean())

    def current_k(self) -> int | None:
        if self.head is None:
            return None
        return k_at_step(self.step, self.total_steps, self.k_init, self.head_config.k, self.cfg.decay_ratio)

    def train_step(self, rows: np.ndarray, k: int | None) -> float:
        """One optimizer step over the global batch `rows` (in grad_accum micro-batches, each sharded over
        the ranks), unless its loss is NaN or Inf (then the run stops); returns the step's mean loss."""
        dead = None if self.head is None else self.counters > self.head_config.dead_threshold
        fired = None if self.head is None else torch.zeros_like(dead)
        self.optimizer.zero_grad(set_to_none=True)
        rows = rows[: len(rows) - len(rows) % dist.world_size()]  # equal shards (distributed.shard)
        micros = np.array_split(rows, math.ceil(len(rows) / self.cfg.batch_size))
        total = torch.zeros((), device=self.device)
        for i, micro in enumerate(micros):
            local = dist.shard(micro)
            labels = None if self.labels is None else self.labels[local].to(self.device)
            # DDP averages the gradients once, after the last micro-batch's backward
            accumulate = self.objective.no_sync() if dist.active() and i < len(micros) - 1 else contextlib.nullcontext()
            with accumulate, tf32_matmuls(self.cfg.tf32):  # forward and backward, as in the head-only Trainer
                with self.autocast:
                    loss, fired_now = self.objective(self._batch(local), k, dead, labels)
                (loss * len(micro) / len(rows)).backward()  # the mean over the whole step's items
            total += loss.detach() * len(micro) / len(rows)
            if fired_now is not None:
                fired |= fired_now
        self.run.watch(total, self.step + 1)
        self.optimizer.step()
        if self.head is not None:
            self.counters = update_dead_counters(self.counters, fired)
        return float(dist.sum_over_ranks(total)) / dist.world_size()

    # --- named steps ---------------------------------------------------------------------------
    def _batch(self, rows: np.ndarray):
        """The items of `rows`: images, or texts (queries then their documents for pairs)."""
        if not self.text:
            return self.items[rows]
        return [self.items[i] for i in rows] + ([self.documents[i] for i in rows] if self.mode == "pairs" else [])

    def _settings(self) -> dict:
        """What defines the run (run.py adds the version, step and steps): compared when resuming."""
        labels = None if self.labels is None else self.labels.numpy()
        settings = {"train": self.cfg, "finetune": self.ft, "backbone": self.backbone.name, "contrastive": self.mode,
                    "samples": len(self.items), "data_fingerprint": fingerprint(self.items, labels, self.documents)}
        if self.head is not None:
            settings |= {"head": self.head_config, "k_init": self.k_init, "started_from_head": self.started_from_head}
        if not self.text:
            settings["image_size"] = self.backbone.image_size
        return settings

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The loop's own state in a checkpoint: the dead-latent counters (csrv2 objective)."""
        return {} if self.head is None else {"counters": self.counters}

    def _load_weights(self, ckpt: Path) -> None:
        path = ckpt / BACKBONE_WEIGHTS
        try:
            load_model(self.model, str(path))
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{path}: does not load into this backbone ({reason}); start over with --overwrite") from e
        if self.head is not None:
            self.head.load_state_dict(load_head(ckpt).state_dict())

    def _log(self, loss: float, k: int | None, epoch: int) -> dict:
        record = {"step": self.step, "epoch": epoch, "loss": loss}
        if self.head is not None:
            record |= {"k": k, "dead_pct": 100.0 * self.dead_fraction()}
        self.run.log(record, loss=f"{loss:.4g}", **({} if k is None else {"k": k, "dead": f"{record['dead_pct']:.1f}%"}))
        return record

    def _write_weights(self, folder: Path) -> None:
        """backbone.safetensors, and the head's config.json and model.safetensors (csrv2 objective): a checkpoint's or an image model's."""
        save_model(self.model, str(folder / BACKBONE_WEIGHTS))
        if self.head is not None:
            write_head_files(self.head, folder)

    def _trained_backbone(self) -> TextBackbone | ImageBackbone:
        """The backbone as trained, in eval mode, LoRA adapters merged into its weights."""
        if self.peft is not None:
            self.model[0].model = self.peft.merge_and_unload()
        self.model.eval()
        if self.head is not None:
            self.head.eval()
        name = f"{self.backbone.name} (finetuned with csrv2, {self.ft.objective})"
        if self.text:
            return TextBackbone.from_model(self.model, name)
        return ImageBackbone.from_model(self.model, self.backbone.image_size, name)

    def _write_model(self, trained: TextBackbone | ImageBackbone, settings: dict) -> None:
        """Replace the run folder by the model folder, whole, keeping the training log."""

        def fill(folder: Path) -> None:
            if self.text and self.head is not None:
                to_sparse_encoder(trained, self.head).save(str(folder))
            elif self.text:
                self.model.save(str(folder))
            else:
                self._write_weights(folder)
            write_json(folder / SETTINGS_FILE, settings)
            if (self.out / LOG_FILE).exists():
                shutil.copyfile(self.out / LOG_FILE, folder / LOG_FILE)

        write_folder(self.out, fill, overwrite=True)


def finetune_text(backbone: TextBackbone, texts: list[str], labels: np.ndarray | None = None, documents: list[str] | None = None,
                  **options) -> tuple[TextBackbone, SparseHead | None]:
    """Train a text backbone end to end (see `Finetuner` for the options); returns the trained backbone and head."""
    return Finetuner(backbone, list(texts), labels, documents, **options).fit()


def finetune_images(backbone: ImageBackbone, images: np.ndarray, labels: np.ndarray | None = None,
                    **options) -> tuple[ImageBackbone, SparseHead | None]:
    """Train EfficientNet-Lite0 end to end on (n, H, W[, 3]) images; returns the trained backbone and head."""
    images = np.asarray(images)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise InputError(f"images have shape {images.shape}; pass (n, H, W) gray or (n, H, W, 3) colour images")
    return Finetuner(backbone, images, labels, **options).fit()


def read_image_model(folder: str | os.PathLike, device: str = "cpu") -> tuple[ImageBackbone, SparseHead | None]:
    """The backbone and head (None for a matryoshka model) of an image model folder written by finetuning."""
    folder = Path(folder)
    settings = read_settings(folder) if folder.is_dir() else {}
    if "image_size" not in settings or not (folder / BACKBONE_WEIGHTS).is_file():
        raise InputError(f"{folder}: not an image model folder (needs {BACKBONE_WEIGHTS} and csrv2.json); "
                         "pass the --out of image finetuning")
    backbone = ImageBackbone(settings["image_size"], device, weights=folder / BACKBONE_WEIGHTS)
    head = load_head(folder, device) if settings["finetune"]["objective"] == "csrv2" else None
    return backbone, head


__all__ = ["BACKBONE_WEIGHTS", "FinetuneConfig", "Finetuner", "finetune_images", "finetune_text", "read_image_model"]
