"""The terms of the CSRv2 objective as pure functions: tensors in, scalar out, no state, no I/O.

    L = MSE(x, x_hat_k) + 1/8 MSE(x, x_hat_4k) + beta AuxK + gamma L_cl

objective.py assembles them. The contrastive forms take a similarity matrix s = cosine / T (cosine_logits)
and reproduce the official two-view recipe, whose second "view" is an exact copy of the first (no
augmentation), from that one matrix: every other sample then appears twice (once per view) and each
anchor also meets its own copy, at similarity ||z_i||^2 / T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements. x, x_hat: (batch, input_dim)."""
    return F.mse_loss(x_hat, x)


def auxk_loss(residual: torch.Tensor, residual_hat: torch.Tensor, any_dead: torch.Tensor | bool,
              baseline: torch.Tensor | None = None) -> torch.Tensor:
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


def cosine_logits(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """a: (n, dim), b: (m, dim) -> (n, m) cosine similarities / temperature (zero rows give 0)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature


def supervised_contrastive_from_logits(logits: torch.Tensor, labels: torch.Tensor, column_labels: torch.Tensor | None = None,
                                       offset: int = 0) -> torch.Tensor:
    """CSRv2's supervised contrastive loss, two identical views, from s = cosine / T: (batch, batch), or (n, batch)
    for n rows of the batch whose own copies are columns offset .. offset + n. labels: (n,); column_labels: (batch,).

    With positives P(i) = the other samples of i's label and negatives N(i) = the rest:
        pos_i = e^{s_ii} + 2 sum_{p in P(i)} e^{s_ip}      (own copy, then both views of each positive)
        neg_i = 2 sum_{n in N(i)} e^{s_in}
        L = -mean_i log(pos_i / (pos_i + neg_i))
    Computed in log space (logsumexp), so small temperatures cannot overflow.
    """
    column_labels = labels if column_labels is None else column_labels
    same = labels[:, None] == column_labels[None, :]
    rows, cols = logits.shape
    eye = torch.arange(rows, device=logits.device)[:, None] + offset == torch.arange(cols, device=logits.device)[None, :]
    # log-weights: 0 for the own copy (weight 1), log 2 for both views of another sample.
    log_w = torch.where(eye, 0.0, math.log(2.0)).to(logits.dtype)
    log_pos = torch.logsumexp(torch.where(same, logits + log_w, -torch.inf), dim=1)
    log_all = torch.logsumexp(logits + log_w, dim=1)
    return (log_all - log_pos).mean()


def self_contrastive_from_logits(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """CSR v1's self-supervised contrastive loss, from s as for the supervised one: each sample's only positive is its own copy.

    The supervised loss with every sample its own class: L = -mean_i log(e^{s_ii} / (e^{s_ii} + 2 sum_{j != i} e^{s_ij})).
    """
    rows, cols = logits.shape
    own = torch.arange(rows, device=logits.device) + offset
    return supervised_contrastive_from_logits(logits, own, torch.arange(cols, device=logits.device), offset)


def pairs_contrastive_from_logits(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """In-batch-negatives loss for query/document pairs, from the query-document matrix s = cosine / T: (batch, batch),
    or (n, batch) for n queries whose documents are columns offset .. offset + n.

    L = -mean_i log(e^{s(q_i, d_i)} / sum_j e^{s(q_i, d_j)}): each query's document is its positive, the
    other documents of the batch its negatives.
    """
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device) + offset)


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
