"""Several processes, one training run: torchrun starts them, torch.distributed connects them, and
DistributedDataParallel averages their gradients. Every helper is a no-op in a single process, so the
trainer calls them unconditionally.

How W ranks reproduce one process: each optimizer step's global batch (batch_size rows of the epoch's
order) is split across the ranks, rank r taking rows r, r + W, ..., and every loss term is written so
that the mean of the ranks' losses is the one-process loss of the whole global batch; DDP's gradient
average then gives the one-process gradient:
  reconstruction  a mean over equal-sized shards;
  AuxK            its normaliser (the residual's spread about the global batch mean) is summed over ranks;
  contrastive     each rank's rows against every rank's codes, all-gathered with their gradients, the
                  column of a row's own copy offset by rank x shard size;
  dead latents    a latent fired on any rank fired (all-reduced max), so the counters agree everywhere.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from .errors import InputError


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and return this rank's device.

    Under torchrun every rank is told the same device name; a CUDA rank takes the GPU of its LOCAL_RANK.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def check_batch(batch_size: int) -> None:
    """Raise on every rank unless the global batch splits evenly over the ranks."""
    if batch_size % world_size():
        raise InputError(f"batch_size {batch_size} does not split evenly over {world_size()} processes; pass a multiple of {world_size()}")


def wrap(module: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False) -> torch.nn.Module:
    """The module in DistributedDataParallel across processes (which averages its gradients), else itself."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, [device] if device.type == "cuda" else None, find_unused_parameters=find_unused_parameters)


def shard(rows: np.ndarray) -> np.ndarray:
    """This rank's part of a global batch: rows[rank::world] (all of it in one process).

    Ranks must hold equal parts (all-gather needs equal sizes, and DDP's average of per-rank means is the
    global mean only then), so a batch that does not split evenly, an epoch's last, loses its last
    len(rows) % world rows; the next epoch's order differs, so other rows are left out then.
    """
    world = world_size()
    return rows[: len(rows) - len(rows) % world][rank() :: world]


class _Gather(torch.autograd.Function):
    """All-gather whose backward hands each rank the gradient of its part summed over every rank's loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
        # all_gather_single replaces all_gather_into_tensor in newer torch
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # an all-reduce, not a reduce-scatter, which gloo lacks
        return grad.chunk(world_size())[rank()]


def gather(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world x n, ...) in rank order, on every rank; gradients flow back to each rank's part."""
    return _Gather.apply(x) if active() else x


def gather_labels(x: torch.Tensor) -> torch.Tensor:
    """As `gather`, for tensors without gradients (labels, code indices)."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over ranks (a new tensor, no gradient)."""
    if not active():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def any_rank(mask: torch.Tensor) -> torch.Tensor:
    """Elementwise OR of a bool tensor over ranks."""
    if not active():
        return mask
    x = mask.to(torch.uint8)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.bool()


def same_everywhere(value, what: str) -> None:
    """Raise on every rank (so none is left waiting) unless all ranks hold the same value."""
    if not active():
        return
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise ValueError(f"ranks see different {what}: {values}; give every rank the same data and options")


def barrier() -> None:
    if active():
        dist.barrier()


def close() -> None:
    """Leave the process group (at the end of a command, so every rank exits cleanly, on error too)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["active", "any_rank", "barrier", "check_batch", "close", "gather", "gather_labels", "init", "is_main", "rank",
           "same_everywhere", "shard",
           "sum_over_ranks", "world_size", "wrap"]
