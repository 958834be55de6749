"""The CSRv2 objective on one batch, and the one place that chooses how it is computed.

    L = MSE(x, x_hat_k) + 1/8 MSE(x, x_hat_4k) + beta AuxK + gamma L_cl

`reference_losses` writes it out with plain autograd on zero-filled codes, in the paper's order, to be
read against the paper. `fast_losses` computes the same numbers the way training runs them: each code
set decoded by gathering rows of W when that is cheaper (`gather_pays`), AuxK that on a GPU never waits
for the host, sparse contrastive similarities, and on CPUs with numba the compiled kernels of kernels.py.
`step_losses` picks one: the fast path (compiled where kernels.available) unless REFERENCE is set. The
tests hold the fast path to the reference in every contrastive mode. `Objective` is the module that
DistributedDataParallel wraps; `matryoshka_loss` is the objective of the Matryoshka (MRL) peers.

Across processes (distributed.py) each rank computes its shard's losses so that their mean is the
one-process loss of the global batch: fired latents are OR-ed over ranks, AuxK's normaliser is the
residual's spread over the global batch, and the contrastive loss sets this rank's rows against the
codes of every rank.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import distributed as dist
from . import kernels
from .config import TrainConfig, resolve_temperature
from .head import SparseHead
from .losses import (
    auxk_loss,
    cosine_logits,
    pairs_contrastive_from_logits,
    reconstruction_loss,
    residual_spread,
    self_contrastive_from_logits,
    supervised_contrastive_from_logits,
    total_loss,
)

REFERENCE = False
"""Run every step through `reference_losses` (to check a result against the plain objective); off, through `fast_losses`."""


def step_losses(
    head: SparseHead,
    x: torch.Tensor,
    k: int,
    dead: torch.Tensor,
    cfg: TrainConfig,
    mode: str,
    labels: torch.Tensor | None = None,
    *,
    target: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The CSRv2 objective on one batch: `fast_losses`, compiled where kernels.available, or `reference_losses` if REFERENCE.

    x: (n, input_dim), for mode "pairs" the queries then their documents (n/2 each); dead: (hidden_dim,)
    bool; mode: supervised, pairs, self or none; labels: (n,) for mode "supervised"; target: (n, input_dim),
    what the codes reconstruct (default x; end to end may pass x.detach(), so that the backbone learns through the
    head's input alone). Returns the losses
    (0-dim tensors: loss_k, loss_4k, loss_aux, loss_cl and their weighted sum loss) and fired:
    (hidden_dim,) bool, the latents active in some top-k code.
    """
    if REFERENCE:
        return reference_losses(head, x, k, dead, cfg, mode, labels, target=target)
    return fast_losses(head, x, k, dead, cfg, mode, labels, target=target, compiled=kernels.available(x.device, head.weight.dtype))


# --- the reference: the paper's objective, top to bottom ---------------------------------------------


def reference_losses(
    head: SparseHead,
    x: torch.Tensor,
    k: int,
    dead: torch.Tensor,
    cfg: TrainConfig,
    mode: str,
    labels: torch.Tensor | None = None,
    *,
    target: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`step_losses` by plain autograd on zero-filled (n, hidden_dim) codes.

    z_k = ReLU(TopK_k(pre)) and z_4k = ReLU(TopK_4k(pre)) decode through the tied W into x_hat_k and
    x_hat_4k, each compared with the target (default x). AuxK: the top k_aux pre-activations among the dead
    latents decode the residual target - x_hat_k (the gradient stopped through x_hat_k), normalised by the
    residual's spread over the batch; a latent that fires in this batch is not dead for it (as in the official
    recipe, whose counters are updated by the top-k before AuxK reads them). L_cl: the contrastive form `mode`
    on the cosines of the k-sparse codes (losses.py): supervised (labels), pairs (queries against their
    documents), self, or none.
    """
    h, weight = head.config.hidden_dim, head.weight
    target = x if target is None else target
    x_in, mu, std = head.standardize(x)  # identity unless config.normalize
    pre = F.linear(x_in - head.pre_bias, weight, head.latent_bias)  # (n, h) = W (x - b_pre) + b_lat, the one encoder product
    top = pre.topk(min(4 * k, h), dim=1)  # (n, 4k), sorted: its first k columns are the top-k
    z_4k = sparse_to_dense(top.indices, top.values.relu(), h)  # (n, h)
    z_k = sparse_to_dense(top.indices[:, :k], top.values[:, :k].relu(), h)  # (n, h)
    x_hat_k = head.unstandardize(z_k @ weight, std, mu)  # (W^T z + b_pre) std + mu: (n, d)
    x_hat_4k = head.unstandardize(z_4k @ weight, std, mu)
    fired = dist.any_rank((z_k > 0).any(0))  # (h,), over the global batch

    dead = dead & ~fired
    # Live latents are masked to -inf: when fewer than k_aux are dead, the ReLU zeroes the live ones the top-k_aux takes.
    aux = pre.masked_fill(~dead, -torch.inf).topk(head.config.k_aux, dim=1)
    z_aux = sparse_to_dense(aux.indices, aux.values.relu(), h)  # (n, h)
    residual = target - x_hat_k.detach()
    residual_hat = head.unstandardize(z_aux @ weight, std, bias=False)  # W^T z_aux, in x's scale

    if mode == "none":
        loss_cl = torch.zeros((), device=x.device)
    else:
        queries, documents = z_k.chunk(2) if mode == "pairs" else (z_k, z_k)
        temperature = resolve_temperature(cfg.temperature, mode, head.config.k)
        loss_cl = _contrastive(cosine_logits(queries, dist.gather(documents), temperature), mode, labels)
    losses = {
        "loss_k": reconstruction_loss(target, x_hat_k),
        "loss_4k": reconstruction_loss(target, x_hat_4k),
        "loss_aux": _auxk(residual, residual_hat, dead.any()),
        "loss_cl": loss_cl,
    }
    return _with_total(losses, cfg), fired


def _auxk(residual: torch.Tensor, residual_hat: torch.Tensor, any_dead: torch.Tensor) -> torch.Tensor:
    """auxk_loss of residual_hat against residual, both (n, d), normalised by the residual's spread over the global batch."""
    total, total_square = dist.sum_over_ranks(residual.sum(0)), dist.sum_over_ranks(residual.square().sum())
    return auxk_loss(residual, residual_hat, any_dead, residual_spread(total, total_square, len(residual) * dist.world_size()))


def _contrastive(logits: torch.Tensor, mode: str, labels: torch.Tensor | None) -> torch.Tensor:
    """The contrastive form `mode` (supervised, pairs or self) of this rank's n rows against the global batch.

    logits: (n, world x n) = cosine / T, the columns in rank order, so that row i's own copy (or its
    document) is column rank x n + i; labels: (n,) for supervised.
    """
    offset = dist.rank() * len(logits)
    if mode == "pairs":
        return pairs_contrastive_from_logits(logits, offset)
    if mode == "self":
        return self_contrastive_from_logits(logits, offset)
    return supervised_contrastive_from_logits(logits, labels, dist.gather_labels(labels), offset)


def _with_total(losses: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    losses["loss"] = total_loss(**losses, multi_k_coef=cfg.multi_k_coef, aux_coef=cfg.aux_coef, cl_coef=cfg.cl_coef)
    return losses


def sparse_to_dense(indices: torch.Tensor, values: torch.Tensor, dim: int) -> torch.Tensor:
    """indices, values: (batch, k) -> (batch, dim) zero-filled codes, differentiable in `values`."""
    return torch.zeros(indices.shape[0], dim, dtype=values.dtype, device=values.device).scatter(1, indices, values)


class Objective(torch.nn.Module):
    """The head and its objective as one module, whose forward is `step_losses`: what DistributedDataParallel wraps."""

    def __init__(self, head: SparseHead, cfg: TrainConfig, mode: str) -> None:
        super().__init__()
        self.head, self.cfg, self.mode = head, cfg, mode

    def forward(self, x: torch.Tensor, k: int, dead: torch.Tensor, labels: torch.Tensor | None):
        return step_losses(self.head, x, k, dead, self.cfg, self.mode, labels)


def matryoshka_loss(z: torch.Tensor, dims: tuple[int, ...], mode: str, labels: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Mean over m in dims of the contrastive loss on z[:, :m]. z: (batch, max(dims)), or (2 batch, .) for pairs.

    Across processes (distributed.py) each rank's rows meet the prefixes of the whole global batch.
    """
    losses = []
    for m in dims:
        prefix = F.normalize(z[:, :m], dim=-1)  # as cosine_logits, each row normalised once for both sides
        queries, documents = prefix.chunk(2) if mode == "pairs" else (prefix, prefix)
        losses.append(_contrastive(queries @ dist.gather(documents).T / temperature, mode, labels))  # (n, world x n)
    return torch.stack(losses).mean()


# --- the fast path: the same numbers, computed as training runs them -----------------------------------

GATHER_LIMITS = {"cpu": 16, "cuda": 128}
"""Per device type: sparse codes with at most dim / limit non-zeros per row are multiplied by gathering the rows
they use (embedding_bag), denser ones are zero-filled for one dense product. Measured, forward and backward of
128 codes decoded through a (1536, 384) W on 2 CPU cores: gathering 96 rows took 2.7 ms, 160 rows 3.9 ms, the
dense product 3.6 ms at any width; on an H200 (TF32 products; d 4096, h 16384, batch 4096, k 64), zero-filling
took 31.5 ms a step against 50.0 for gathering 4k = dim / 64 rows."""


def gather_pays(nonzeros: int, dim: int, device: torch.device | str = "cpu") -> bool:
    """Whether rows with `nonzeros` non-zeros out of `dim` are cheaper to multiply by gathering than zero-filled."""
    device_type = torch.device(device).type
    return nonzeros * GATHER_LIMITS.get(device_type, GATHER_LIMITS["cpu"]) <= dim


def sparse_cosine_logits(q_idx: torch.Tensor, q_val: torch.Tensor, d_idx: torch.Tensor, d_val: torch.Tensor, dim: int,
                         temperature: float, compiled: bool = False) -> torch.Tensor:
    """`cosine_logits` of sparse codes: q (n, k) and d (m, k) indices and values in a space of `dim` -> (n, m).

    Few non-zeros: the d codes are zero-filled into a (dim, m) matrix and each q row sums the k rows of
    it that its indices pick (embedding_bag), n k m work instead of n dim m; the cost of a product of
    zero-filled codes does not shrink with k. `compiled` (CPUs with numba: kernels.available):
    kernels.sparse_dots meets only the non-zeros two codes share. Values need not be normalised; zero rows give 0.
    """
    q_val, d_val = F.normalize(q_val, dim=-1), F.normalize(d_val, dim=-1)
    if compiled:
        return kernels.sparse_dots(q_idx, q_val, d_idx, d_val, dim) / temperature
    if not gather_pays(q_idx.shape[1], dim, q_val.device):
        return sparse_to_dense(q_idx, q_val, dim) @ sparse_to_dense(d_idx, d_val, dim).T / temperature
    d_columns = torch.zeros(dim, len(d_idx), dtype=d_val.dtype, device=d_val.device).scatter(0, d_idx.T, d_val.T)  # (dim, m)
    return F.embedding_bag(q_idx, d_columns, per_sample_weights=q_val, mode="sum") / temperature


def fast_losses(
    head: SparseHead,
    x: torch.Tensor,
    k: int,
    dead: torch.Tensor,
    cfg: TrainConfig,
    mode: str,
    labels: torch.Tensor | None = None,
    *,
    target: torch.Tensor | None = None,
    compiled: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`reference_losses`, computed without a dense code; `compiled` (CPUs with numba: kernels.available) runs the
    selection, the decode and the whole backward of the head in kernels.py.

    What keeps it cheap: the top-k and top-4k come from one top-4k of the pre-activations; x_hat_4k =
    x_hat_k + the rows of latents k+1..4k, each code set decoded by gathering rows of W when it is small;
    AuxK reads only dead latents (on CPU it costs nothing when none is dead; on a GPU it never waits for
    the host) and never edits the pre-activations in place; the contrastive loss reads the single view of
    the codes, which the official recipe recomputes as an identical copy, and gathers its similarities.
    Compiled, autograd's dense products and zero-filled buffers, which cost more than the sparse work they
    hold on a CPU, are left out.
    """
    target = x if target is None else target
    x_in, mu, std = head.standardize(x)
    with torch.no_grad() if compiled else nullcontext():  # the compiled path builds the gradients itself
        pre = head.project(x_in)  # (n, h)
    step = _compiled_codes(head, x_in, pre, k, dead) if compiled else _autograd_codes(head, pre, k, dead)
    x_hat_k = head.unstandardize(step.sum_k, std, mu)
    x_hat_4k = head.unstandardize(step.sum_k + step.sum_rest, std, mu)
    residual = target - x_hat_k.detach()
    if step.sum_aux is None:
        loss_aux = torch.zeros((), device=x.device)
    else:
        loss_aux = _auxk(residual, head.unstandardize(step.sum_aux, std, bias=False), step.any_dead)
    losses = {
        "loss_k": reconstruction_loss(target, x_hat_k),
        "loss_4k": reconstruction_loss(target, x_hat_4k),
        "loss_aux": loss_aux,
        "loss_cl": _sparse_contrastive(step.idx_k, step.val_k, head.config.hidden_dim, mode, labels,
                                       resolve_temperature(cfg.temperature, mode, head.config.k), compiled),
    }
    return _with_total(losses, cfg), step.fired


class _Codes(NamedTuple):
    """A fast path's codes and their decoded sums: what the losses read."""

    fired: torch.Tensor  # (h,) bool, over the global batch
    idx_k: torch.Tensor  # (n, k) the top-k latents
    val_k: torch.Tensor  # (n, k) their values after the ReLU
    sum_k: torch.Tensor  # (n, d) W^T z_k
    sum_rest: torch.Tensor  # (n, d) W^T z of latents k+1..4k, so that W^T z_4k = sum_k + sum_rest
    sum_aux: torch.Tensor | None  # (n, d) W^T z_aux of the dead latents; None where AuxK is known to be 0
    any_dead: torch.Tensor  # 0-dim bool


def _autograd_codes(head: SparseHead, pre: torch.Tensor, k: int, dead: torch.Tensor) -> _Codes:
    """Selection and decoding through autograd, each code set gathered or zero-filled as `gather_pays` says."""
    h = head.config.hidden_dim
    top = pre.topk(min(4 * k, h), dim=1)
    idx_4k, val_4k = top.indices, top.values.relu()  # (n, 4k), largest first
    idx_k, val_k = idx_4k[:, :k], val_4k[:, :k]  # (n, k)
    fired, dead = _fire(idx_k, val_k, dead, h)
    gathered = [gather_pays(width, h, pre.device) for width in (k, idx_4k.shape[1] - k)]
    sum_k, sum_rest = head.decode_sums([(idx_k, val_k), (idx_4k[:, k:], val_4k[:, k:])], gathered)  # (n, d) each
    return _Codes(fired, idx_k, val_k, sum_k, sum_rest, _dead_sums(head, pre, dead), dead.any())


def _compiled_codes(head: SparseHead, x_in: torch.Tensor, pre: torch.Tensor, k: int, dead: torch.Tensor) -> _Codes:
    """Selection and decoding in kernels.py, whose SelectedLatents builds the gradients of the head and of x_in."""
    h = head.config.hidden_dim
    idx_4k = kernels.top_latents(pre, k, min(4 * k, h))  # (n, 4k), the top-k first
    idx_k = idx_4k[:, :k]
    # the top-k values before the ReLU (positive exactly where after it), read only for `fired`: z comes from the kernel
    fired, dead = _fire(idx_k, pre.gather(1, idx_k), dead, h)
    idx_aux = _dead_top(pre, dead, head.config.k_aux)  # (n, k_aux or fewer)
    z, sum_k, sum_rest, sum_aux = kernels.select(
        x_in, head.pre_bias, head.weight, head.latent_bias, pre, torch.cat([idx_4k, idx_aux], 1),
        (k, idx_4k.shape[1] - k, idx_aux.shape[1]))
    return _Codes(fired, idx_k, z[:, :k], sum_k, sum_rest, sum_aux if idx_aux.shape[1] else None, dead.any())


def _fire(idx_k: torch.Tensor, val_k: torch.Tensor, dead: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k codes (n, k) -> fired: (h,) the latents with a positive value in one of them over the global batch,
    and dead: (h,) without the fired ones (a latent that fires in this batch is not dead for it)."""
    fired = torch.zeros(h, device=idx_k.device).index_add_(0, idx_k.reshape(-1), (val_k > 0).reshape(-1).float()) > 0
    fired = dist.any_rank(fired)
    return fired, dead & ~fired


def _dead_sums(head: SparseHead, pre: torch.Tensor, dead: torch.Tensor, read_count: bool | None = None) -> torch.Tensor | None:
    """AuxK's W^T z_aux: (n, d) from the top k_aux dead pre-activations of pre: (n, h); None when none is dead.

    read_count (default: on CPU) lets the host read how many latents are dead and pick the cheaper
    path; on a GPU that read would stall the step until the device catches up, so both give one result.
    """
    h, k_aux = head.config.hidden_dim, head.config.k_aux
    if pre.device.type == "cpu" if read_count is None else read_count:
        dead_ids = dead.nonzero().squeeze(1)  # (n_dead,); with none dead the loss is 0 and costs nothing
        if len(dead_ids) == 0:
            return None
        if 2 * len(dead_ids) <= h:  # few dead: work on their columns only, a (n, n_dead) x (n_dead, d) product
            top = pre[:, dead_ids].topk(min(k_aux, len(dead_ids)), dim=1)
            z = torch.zeros(len(pre), len(dead_ids), dtype=pre.dtype, device=pre.device).scatter(1, top.indices, top.values.relu())
            return z @ head.weight[dead_ids]
    # Mask a copy of pre: live latents are -inf, so any of them the top k_aux still takes (fewer than k_aux
    # dead) is zeroed by the ReLU, and with none dead the loss is 0, all without reading the count.
    top = pre.masked_fill(~dead, -torch.inf).topk(k_aux, dim=1, sorted=False)
    return head.decode_sums([(top.indices, top.values.relu())], [gather_pays(k_aux, h, pre.device)])[0]


def _dead_top(pre: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK's latents: per row of pre (n, h), the k_aux largest among the dead ones (all of them when fewer
    are dead) -> (n, min(k_aux, n_dead)) latent ids; reads the dead count, so for CPUs only."""
    dead_ids = dead.nonzero().squeeze(1)  # (n_dead,)
    count = min(k_aux, len(dead_ids))
    return kernels.top_latents(pre, count, count, dead_ids) if count else dead_ids.new_zeros(len(pre), 0)


def _sparse_contrastive(idx: torch.Tensor, val: torch.Tensor, h: int, mode: str, labels: torch.Tensor | None, temperature: float,
                        compiled: bool) -> torch.Tensor:
    """The contrastive loss on the k-sparse codes (idx, val): (n, k); across processes the codes of the whole
    global batch travel as (n, k) pairs."""
    if mode == "none":
        return torch.zeros((), device=val.device)
    if mode == "pairs":
        (qi, di), (qv, dv) = idx.chunk(2), val.chunk(2)
    else:
        qi, di, qv, dv = idx, idx, val, val
    return _contrastive(sparse_cosine_logits(qi, qv, dist.gather_labels(di), dist.gather(dv), h, temperature, compiled), mode, labels)


__all__ = ["GATHER_LIMITS", "REFERENCE", "Objective", "fast_losses", "gather_pays", "matryoshka_loss", "reference_losses",
           "sparse_cosine_logits", "sparse_to_dense", "step_losses"]
