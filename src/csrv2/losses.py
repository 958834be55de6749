"""The CSRv2 objective as pure functions: tensors in, scalar out, no state, no I/O.

    L = MSE(x, x_hat_k) + 1/8 MSE(x, x_hat_4k) + beta AuxK + gamma L_cl

The contrastive forms reproduce the official two-view recipe, whose second "view" is an exact copy
of the first (no augmentation), from one (batch, batch) similarity matrix: every other sample then
appears twice (once per view) and each anchor also meets its own copy, at similarity ||z_i||^2 / T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import kernels


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements. x, x_hat: (batch, input_dim)."""
    return F.mse_loss(x_hat, x)


def auxk_loss(residual: torch.Tensor, residual_hat: torch.Tensor, any_dead: torch.Tensor | bool, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised MSE of the dead latents' reconstruction of the residual x - x_hat_k.

    residual: (batch, input_dim), computed with the gradient stopped through x_hat_k;
    residual_hat: (batch, input_dim), W^T z_aux from the top k_aux dead pre-activations.
    MSE(residual_hat, residual) / MSE(mean over the batch of residual, residual); exactly 0 when no
    latent is dead (`any_dead` is a 0-dim bool tensor so that no host synchronisation is needed) and
    when the residual does not vary over the batch (the normaliser is 0). `baseline` replaces the
    normaliser, e.g. by the residual's spread over a batch split across processes (residual_spread).
    """
    mse = F.mse_loss(residual_hat, residual)
    if baseline is None:
        baseline = residual_spread(residual.sum(0), residual.square().sum(), len(residual))
    ratio = torch.where(baseline > 0, mse / baseline.clamp_min(torch.finfo(mse.dtype).tiny), torch.zeros_like(mse))
    return ratio * torch.as_tensor(any_dead, dtype=ratio.dtype, device=ratio.device)


def residual_spread(total: torch.Tensor, total_square: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """MSE of n rows about their mean, from their sum (d,) and the sum of their squares (0-dim): E[r^2] - E[r]^2 per element."""
    return (total_square - total.square().sum() / n) / (n * total.numel())


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
                         temperature: float) -> torch.Tensor:
    """`cosine_logits` of sparse codes: q (n, k) and d (m, k) indices and values in a space of `dim` -> (n, m).

    Few non-zeros: the d codes are zero-filled into a (dim, m) matrix and each q row sums the k rows of
    it that its indices pick (embedding_bag), n k m work instead of n dim m; the cost of a product of
    zero-filled codes does not shrink with k. On CPUs with numba, kernels.sparse_dots meets only
    the non-zeros two codes share. Values need not be normalised; zero rows give 0.
    """
    q_val, d_val = F.normalize(q_val, dim=-1), F.normalize(d_val, dim=-1)
    if kernels.available(q_val.device, q_val.dtype):
        return kernels.sparse_dots(q_idx, q_val, d_idx, d_val, dim) / temperature
    if not gather_pays(q_idx.shape[1], dim, q_val.device):
        return sparse_to_dense(q_idx, q_val, dim) @ sparse_to_dense(d_idx, d_val, dim).T / temperature
    d_columns = torch.zeros(dim, len(d_idx), dtype=d_val.dtype, device=d_val.device).scatter(0, d_idx.T, d_val.T)  # (dim, m)
    return F.embedding_bag(q_idx, d_columns, per_sample_weights=q_val, mode="sum") / temperature


def cosine_logits(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """a: (n, dim), b: (m, dim) -> (n, m) cosine similarities / temperature (zero rows give 0)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature


def supervised_contrastive_loss(codes: torch.Tensor, labels: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """CSRv2's supervised contrastive loss, two identical views. codes: (batch, dim), labels: (batch,).

    With s_ij = cos(z_i, z_j) / T, positives P(i) = other samples of i's label, negatives N(i) = the rest:
        pos_i = e^{s_ii} + 2 sum_{p in P(i)} e^{s_ip}      (own copy, then both views of each positive)
        neg_i = 2 sum_{n in N(i)} e^{s_in}
        L = -mean_i log(pos_i / (pos_i + neg_i))
    Computed in log space (logsumexp), so small temperatures cannot overflow.
    """
    return supervised_contrastive_from_logits(cosine_logits(codes, codes, temperature), labels)


def supervised_contrastive_from_logits(logits: torch.Tensor, labels: torch.Tensor, column_labels: torch.Tensor | None = None,
                                       offset: int = 0) -> torch.Tensor:
    """`supervised_contrastive_loss` from its matrix s = cosine / T: (batch, batch), or (n, batch) for
    n rows of the batch whose own copies are columns offset .. offset + n (column_labels: (batch,))."""
    column_labels = labels if column_labels is None else column_labels
    same = labels[:, None] == column_labels[None, :]
    rows, cols = logits.shape
    eye = torch.arange(rows, device=logits.device)[:, None] + offset == torch.arange(cols, device=logits.device)[None, :]
    # log-weights: 0 for the own copy (weight 1), log 2 for both views of another sample.
    log_w = torch.where(eye, 0.0, math.log(2.0)).to(logits.dtype)
    log_pos = torch.logsumexp(torch.where(same, logits + log_w, -torch.inf), dim=1)
    log_all = torch.logsumexp(logits + log_w, dim=1)
    return (log_all - log_pos).mean()


def self_contrastive_loss(codes: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """CSR v1's self-supervised contrastive loss: each sample's only positive is its own copy.

    codes: (batch, dim). The supervised loss with every sample its own class:
        L = -mean_i log(e^{s_ii} / (e^{s_ii} + 2 sum_{j != i} e^{s_ij})).
    """
    return supervised_contrastive_loss(codes, torch.arange(len(codes), device=codes.device), temperature)


def pairs_contrastive_loss(query_codes: torch.Tensor, doc_codes: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """In-batch-negatives loss for query/document pairs. query_codes, doc_codes: (batch, dim), row-aligned.

    L = -mean_i log(e^{s(q_i, d_i)} / sum_j e^{s(q_i, d_j)}), s = cosine / T: each query's document
    is its positive, the other documents of the batch its negatives.
    """
    return pairs_contrastive_from_logits(cosine_logits(query_codes, doc_codes, temperature))


def pairs_contrastive_from_logits(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """`pairs_contrastive_loss` from its query-document matrix s = cosine / T: (batch, batch), or (n, batch)
    for n queries whose documents are columns offset .. offset + n."""
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device) + offset)


def sparse_to_dense(indices: torch.Tensor, values: torch.Tensor, dim: int) -> torch.Tensor:
    """indices, values: (batch, k) -> (batch, dim) zero-filled codes, differentiable in `values`."""
    return torch.zeros(indices.shape[0], dim, dtype=values.dtype, device=values.device).scatter(1, indices, values)


def total_loss(
    loss_k: torch.Tensor,
    loss_4k: torch.Tensor,
    loss_aux: torch.Tensor,
    loss_cl: torch.Tensor,
    multi_k_coef: float = 0.125,
    aux_coef: float = 0.1,
    cl_coef: float = 0.1,
) -> torch.Tensor:
    """L = loss_k + multi_k_coef loss_4k + aux_coef AuxK + cl_coef L_cl (paper: 1/8, beta 0.1, gamma 0.1)."""
    return loss_k + multi_k_coef * loss_4k + aux_coef * loss_aux + cl_coef * loss_cl
