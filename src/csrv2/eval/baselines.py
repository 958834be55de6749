"""Matryoshka (MRL) baselines on frozen embeddings: plain truncation, and a Matryoshka-trained linear head.

Truncation keeps the first m dims of the backbone embedding. The linear head maps (n, input_dim) to
(n, max(dims)) and is trained so that every nested prefix z[:, :m], m in dims, is an embedding of its
own: the loss is the mean over m of the same contrastive form csrv2 uses on its sparse codes
(supervised with labels, pairs with documents, else self), on cosine similarity at the same
temperature, with the same optimizer, batch size, epochs and data order as a sparse head, so the two
compete on one budget. Its weights start at the training data's principal directions (largest
first), so a prefix is a sensible embedding from step 0 and training refines the nesting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..atomic import write_bytes, write_json
from ..config import MRL_DIMS, TrainConfig, resolve_device, resolve_temperature
from ..data.training import TrainingData
from ..errors import InputError
from ..objective import matryoshka_loss
from ..run import Run
from ..trainer import batch_embeddings, contrastive_mode, epoch_order

MRL_CONFIG, MRL_WEIGHTS = "mrl.json", "mrl.safetensors"


def truncate(x: np.ndarray, dim: int) -> np.ndarray:
    """x: (n, d) -> (n, dim), the first dim coordinates (no renormalisation: the metrics use cosine)."""
    if not 1 <= dim <= x.shape[1]:
        raise ValueError(f"dim must be in [1, {x.shape[1]}], got {dim}")
    return np.ascontiguousarray(x[:, :dim])


class MatryoshkaHead(torch.nn.Module):
    """z = W x + b, W: (max(dims), input_dim); `encode(x, dim)` is the first dim coordinates of z."""

    def __init__(self, input_dim: int, dims: tuple[int, ...] = MRL_DIMS):
        super().__init__()
        if not dims or list(dims) != sorted(set(dims)) or dims[0] < 1:
            raise ValueError(f"dims must be increasing positive sizes, got {dims}")
        self.dims = tuple(int(m) for m in dims)
        self.linear = torch.nn.Linear(input_dim, self.dims[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    @torch.inference_mode()
    def encode(self, x: np.ndarray, dim: int) -> np.ndarray:
        """x: (n, input_dim) -> (n, dim) float32."""
        if dim not in self.dims:
            raise ValueError(f"dim must be one of the trained sizes {self.dims}, got {dim}")
        z = self.linear(torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.linear.weight.device))
        return z[:, :dim].cpu().numpy()


def principal_directions(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """x: (n, d) -> (W (m, d) top principal directions, largest variance first; bias (m,) = -W mean)."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    if len(vt) < m:
        raise InputError(f"a {m}-dim Matryoshka head needs at least {m} training samples and dims, got {x.shape}")
    return vt[:m], -vt[:m] @ mean


def train_matryoshka(data: TrainingData, cfg: TrainConfig, dims: tuple[int, ...] = MRL_DIMS, progress: bool = True) -> MatryoshkaHead:
    """Train a MatryoshkaHead on `data` with the optimizer, batches and epochs of `cfg` (its sparse-head fields are unused)."""
    device = resolve_device(cfg.device)
    head = MatryoshkaHead(data.dim, dims)
    sample = np.asarray(data.embeddings[np.sort(np.random.default_rng(cfg.seed).permutation(len(data))[:20000])], dtype=np.float64)
    weight, bias = principal_directions(sample, dims[-1])
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(weight))
        head.linear.bias.copy_(torch.from_numpy(bias))
    head.to(device)
    mode = contrastive_mode(cfg, data)
    if mode == "none":
        raise ValueError("a Matryoshka head learns only through its contrastive loss; choose a contrastive form other than 'none'")
    temperature = resolve_temperature(cfg.temperature, mode, None)  # a dense head: the paper's 0.2 unless given
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    b = cfg.batch_size
    steps_per_epoch = -(-len(data) // b)
    total_steps = steps_per_epoch * cfg.epochs
    with Run(None, total_steps, log_every=cfg.log_every, progress=progress, desc="train mrl") as run:
        run.begin(optimizer)
        for step in range(total_steps):
            epoch, position = divmod(step, steps_per_epoch)
            if position == 0:
                order = epoch_order(cfg.seed, epoch, len(data))  # the sparse trainer's order
            rows = np.sort(order[position * b : (position + 1) * b])
            x = batch_embeddings(data, rows, mode == "pairs")
            labels = None if data.labels is None else torch.from_numpy(data.labels[rows]).to(device)
            loss = matryoshka_loss(head(torch.from_numpy(x).to(device)), head.dims, mode, labels, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.watch(loss, step + 1)
            optimizer.step()
            run.advance()
            if run.log_due(step + 1):
                value = loss.item()
                run.log({"step": step + 1, "loss": value}, loss=f"{value:.4g}")
        run.finish(total_steps)
    return head.eval()


def save_matryoshka(head: MatryoshkaHead, folder: str | os.PathLike) -> Path:
    """Write mrl.json + mrl.safetensors into folder (each written aside, then renamed)."""
    folder = Path(folder)
    write_bytes(folder / MRL_WEIGHTS, save({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}))
    write_json(folder / MRL_CONFIG, {"input_dim": head.linear.in_features, "dims": list(head.dims)})
    return folder


def load_matryoshka(folder: str | os.PathLike) -> MatryoshkaHead:
    folder = Path(folder)
    try:
        config = json.loads((folder / MRL_CONFIG).read_text())
        head = MatryoshkaHead(int(config["input_dim"]), tuple(config["dims"]))
        head.load_state_dict(load_file(str(folder / MRL_WEIGHTS)))
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise InputError(f"{folder}: not a csrv2 Matryoshka head ({e}); write one with save_matryoshka") from e
    return head.eval()


__all__ = ["MatryoshkaHead", "load_matryoshka", "principal_directions", "save_matryoshka", "train_matryoshka", "truncate"]
