"""The head's training forward on its selected latents, with a compiled CPU backward (numba).

A step selects, per sample i, m latents idx_ij (the top 4k, then AuxK's dead ones) and needs
    z_ij    = ReLU(pre_ij),  pre_ij = W[idx_ij] . (x_i - b_pre) + b_lat[idx_ij]
    sums_si = sum_{j in set s} z_ij W[idx_ij]                        (the tied decoder, per code set s)
Autograd through the dense pre-activations builds the encoder's weight gradient as a (h, n) x (n, d)
product, although only n m of the n h entries of dL/dpre are non-zero, and the gathered decode's
backward sorts its indices and zero-fills another (h, d) buffer. On a CPU both cost more than the
work they hold. Here one pass per latent r, over the pairs (i, j) that selected it, builds
    dL/dpre_ij  = [z_ij > 0] (dL/dz_ij + W[r] . dL/dsums_si)
    dL/dW[r]    = sum (dL/dpre_ij (x_i - b_pre) + z_ij dL/dsums_si)
    dL/db_lat[r] = sum dL/dpre_ij
with each latent's row written by one thread; dL/dx_i = sum_j dL/dpre_ij W[idx_ij] is one gather, needed
only when x itself is trained (finetuning): b_pre's gradient is -dL/db_lat W.
Without numba (`pip install "csrv2[fast]"`) the trainer keeps autograd's path, the reference the tests
hold this one to.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

try:  # optional, as for the compiled search kernel in index.py
    import numba
except ImportError:
    numba = None

ENABLED = True
"""Whether CPU training uses this path when numba is installed (benchmarks switch it off to compare)."""



def available(device: torch.device | str) -> bool:
    """Whether the compiled backward serves training on `device`: numba is installed, the device is a CPU."""
    return ENABLED and numba is not None and torch.device(device).type == "cpu"


def _bucket(h, latents):
    """Counting sort of pairs by latent. latents: (P,) in [0, h) -> starts (h + 1,), order (P,): the pairs of
    latent r are order[starts[r]:starts[r + 1]], in increasing pair order."""
    starts = np.zeros(h + 1, np.int64)
    for p in range(latents.shape[0]):
        starts[latents[p] + 1] += 1
    for r in range(h):
        starts[r + 1] += starts[r]
    fill = starts[:-1].copy()
    order = np.empty(latents.shape[0], np.int64)
    for p in range(latents.shape[0]):
        order[fill[latents[p]]] = p
        fill[latents[p]] += 1
    return starts, order


def _backward_kernel(weight, xc, g_sums, indices, column_set, z, g_z, grad_w, g_pre, grad_b):
    """The backward above. weight (h, d); xc (n, d) = x - b_pre; g_sums (sets, n, d); indices, z, g_z (n, m);
    column_set (m,) the code set of each column. Writes grad_w (h, d), g_pre (n, m), grad_b (h,)."""
    m = indices.shape[1]
    h, d = weight.shape
    starts, order = _bucket(h, indices.ravel())
    zero = weight.dtype.type(0)  # float32 sums stay float32: a float64 literal would widen every product
    # Rows of grad_w are disjoint and each pair (i, j) belongs to one latent, so threads never share a write.
    # Latents are dealt out in strides, so that the busiest ones (the top-k's) spread over the threads.
    for stride in numba.prange(STRIDES):
        for r in range(stride, h, STRIDES):
            acc = grad_w[r]
            acc[:] = 0
            w_r = weight[r]
            gb = zero
            for q in range(starts[r], starts[r + 1]):
                i, j = divmod(order[q], m)
                g = g_sums[column_set[j], i]
                gp = zero
                if z[i, j] > 0:
                    dot = zero
                    for c in range(d):
                        dot += w_r[c] * g[c]
                    gp = g_z[i, j] + dot
                g_pre[i, j] = gp
                gb += gp
                x, zij = xc[i], z[i, j]
                for c in range(d):
                    acc[c] += gp * x[c] + zij * g[c]
            grad_b[r] = gb


STRIDES = 64

if numba is not None:
    _bucket = numba.njit(cache=True)(_bucket)
    _backward_kernel = numba.njit(parallel=True, fastmath=True, cache=True)(_backward_kernel)


def decode_gathered(indices: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, widths: tuple[int, ...]) -> list[torch.Tensor]:
    """Per code set, sum_j z_ij W[idx_ij]: indices, z (n, m) whose columns are the sets of `widths` -> [(n, d)]."""
    n, d = len(indices), weight.shape[1]
    starts = np.cumsum((0,) + widths)
    bags = [(indices[:, a:b], z[:, a:b]) for a, b in zip(starts, starts[1:]) if b > a]
    if not bags:
        return [weight.new_zeros(n, d) for _ in widths]
    flat_idx = torch.cat([i.reshape(-1) for i, _ in bags])
    offsets = torch.cat([torch.arange(a * n, b * n, b - a) for a, b in zip(starts, starts[1:]) if b > a])
    sums = iter(F.embedding_bag(flat_idx, weight, offsets, mode="sum", per_sample_weights=torch.cat([v.reshape(-1) for _, v in bags])).split(n))
    return [next(sums) if width else weight.new_zeros(n, d) for width in widths]


class SelectedLatents(torch.autograd.Function):
    """(x, b_pre, W, b_lat, pre values, indices, widths) -> (z, *sums): see the module docstring.

    x: (n, d) the (standardized) input; pre_bias: (d,); weight: (h, d); latent_bias: (h,); values: (n, m)
    the pre-activations at indices (n, m) int64, read without gradient from the one encoder product (the
    parameters enter only so that autograd routes their gradients here); widths: the code sets' widths,
    summing to m. Returns z = ReLU(values): (n, m), then each set's decoded sums (n, d).
    """

    @staticmethod
    def forward(ctx, x, pre_bias, weight, latent_bias, values, indices, widths):
        z = values.relu()
        ctx.save_for_backward(x, pre_bias, weight, indices, z)
        ctx.widths = widths
        return (z, *decode_gathered(indices, z, weight, widths))

    @staticmethod
    def backward(ctx, g_z, *g_sums):
        x, pre_bias, weight, indices, z = ctx.saved_tensors
        n, m = indices.shape
        column_set = np.repeat(np.arange(len(ctx.widths)), ctx.widths)
        grad_w, g_pre, grad_b = torch.empty_like(weight), z.new_empty(n, m), weight.new_empty(weight.shape[0])
        _backward_kernel(_array(weight), _array(x - pre_bias), _array(torch.stack(g_sums)), _array(indices), column_set,
                         _array(z), _array(g_z), grad_w.numpy(), g_pre.numpy(), grad_b.numpy())
        # dL/dx_i = sum_j dL/dpre_ij W[idx_ij]; summed over i that is dL/db_lat W, so b_pre needs no gather
        grad_x = F.embedding_bag(indices, weight, mode="sum", per_sample_weights=g_pre) if ctx.needs_input_grad[0] else None
        grad_pre_bias = -(grad_b @ weight) if ctx.needs_input_grad[1] else None
        return grad_x, grad_pre_bias, grad_w, grad_b, None, None, None


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def select(x: torch.Tensor, pre_bias: torch.Tensor, weight: torch.Tensor, latent_bias: torch.Tensor, pre: torch.Tensor,
           indices: torch.Tensor, widths: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """`SelectedLatents` on indices (n, m) of pre (n, h), computed without gradient: -> (z (n, m), *sums (n, d))."""
    return SelectedLatents.apply(x, pre_bias, weight, latent_bias, pre.detach().gather(1, indices), indices, tuple(widths))
