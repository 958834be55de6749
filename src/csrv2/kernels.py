"""The head's training step on its selected latents, compiled for CPUs (numba): the top-k selection, the
decode, the backward, and the contrastive loss's similarities of sparse codes (further down).

A step selects, per sample i, m latents idx_ij (the top 4k, then AuxK's dead ones) and needs
    z_ij    = ReLU(pre_ij),  pre_ij = W[idx_ij] . (x_i - b_pre) + b_lat[idx_ij]
    sums_si = sum_{j in set s} z_ij W[idx_ij]                        (the tied decoder, per code set s)
Autograd through the dense pre-activations builds the encoder's weight gradient as a (h, n) x (n, d)
product, although only n m of the n h entries of dL/dpre are non-zero, and the gathered decode's
backward sorts its indices and zero-fills another (h, d) buffer. On a CPU both cost more than the
work they hold. Here one pass per latent r, over the pairs (i, j) that selected it, builds
    dL/dpre_ij   = [z_ij > 0] (dL/dz_ij + W[r] . dL/dsums_si)
    dL/dW[r]     = sum (dL/dpre_ij (x_i - b_pre) + z_ij dL/dsums_si)
    dL/db_lat[r] = sum dL/dpre_ij
with each latent's row written by one thread; dL/dx_i = sum_j dL/dpre_ij W[idx_ij] is one gather, needed
only when x itself is trained (finetuning): b_pre's gradient is -dL/db_lat W.
objective.fast_losses runs through them where `available`; without numba (`pip install "csrv2[fast]"`) it
keeps autograd's path. The tests hold both to objective.reference_losses.
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
"""Whether CPU training uses this path when numba is installed (benchmarks and tests switch it off to compare)."""

STRIDES = 64
"""Parallel loops deal their rows out in this many strides (r, r + STRIDES, ...), whatever the thread count."""


def available(device: torch.device | str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the compiled step serves training on `device` in `dtype`: numba is installed, the device is a
    CPU and the dtype float32 or float64 (numba has no half types). The kernels compile on first use (seconds,
    once per installation: numba caches them beside this module when it can write there)."""
    return ENABLED and numba is not None and torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64)


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
                zij = z[i, j]
                if zij <= 0:  # the ReLU zeroed it: no gradient through it, nothing decoded from it
                    g_pre[i, j] = zero
                    continue
                g = g_sums[column_set[j], i]
                dot = zero
                for c in range(d):
                    dot += w_r[c] * g[c]
                gp = g_z[i, j] + dot
                g_pre[i, j] = gp
                gb += gp
                x = xc[i]
                for c in range(d):
                    acc[c] += gp * x[c] + zij * g[c]
            grad_b[r] = gb


if numba is not None:
    _bucket = numba.njit(cache=True)(_bucket)
    _backward_kernel = numba.njit(parallel=True, fastmath=True, cache=True)(_backward_kernel)


# --- selection: the top m latents of each row, the top k of them first ------------------------------
# Exact radix selection on float32 bit patterns (a few passes over a row), where torch's topk would
# run nth_element on (value, index) pairs: torch's heap is faster only for m <= h / 64.


def _key(bits):
    """float32 bits (as int64) -> an int64 key in the floats' order (-0.0 just below 0.0)."""
    return bits ^ 0xFFFFFFFF if bits >> 31 else bits | 0x80000000


def _nth_key(keys, count, need, top_hist, hist, candidates):
    """The need-th largest of keys[:count] -> (key, how many keys equal to it to take).

    top_hist (2048,): the counts of the keys' top 11 bits. Only the keys of the bin holding the answer are
    copied to candidates and refined, 11 then 10 bits at a time (hist: scratch of 2048).
    """
    top = 2047
    while top_hist[top] < need:
        need -= top_hist[top]
        top -= 1
    found = 0
    for c in range(count):
        if keys[c] >> 21 == top:
            candidates[found] = keys[c]
            found += 1
    prefix, mask = top << 21, 2047 << 21
    for shift, bits in ((10, 11), (0, 10)):
        width = 1 << bits
        hist[:width] = 0
        for c in range(found):
            if (candidates[c] & mask) == prefix:
                hist[(candidates[c] >> shift) & (width - 1)] += 1
        b = width - 1
        while hist[b] < need:
            need -= hist[b]
            b -= 1
        prefix |= b << shift
        mask |= (width - 1) << shift
    return prefix, need


def _select_row(keys, count, k, m, out, columns, top_hist, hist, candidates):
    """Writes the columns of the top k keys of keys[:count], then of the rest of the top m, into out (m,)."""
    top_hist[:] = 0
    for c in range(count):
        top_hist[keys[c] >> 21] += 1
    t_k, need_k = _nth_key(keys, count, k, top_hist, hist, candidates)
    t_m, need_m = (t_k, need_k) if m == k else _nth_key(keys, count, m, top_hist, hist, candidates)
    a, b = 0, k
    for c in range(count):
        key = keys[c]
        if key < t_m:
            continue
        if key > t_k or (key == t_k and need_k > 0):  # ties go to the first columns, up to the count needed
            if key == t_k:
                need_k -= 1
            if key == t_m:
                need_m -= 1
            out[a] = columns[c]
            a += 1
        elif key > t_m or need_m > 0:
            if key == t_m:
                need_m -= 1
            out[b] = columns[c]
            b += 1


def _select_kernel(pre, columns, k, m, out):
    """pre (n, h) float32; columns (c,) the candidates -> out (n, m): top k then the rest of the top m of each row."""
    bits = pre.view(np.uint32)
    n, count = pre.shape[0], columns.shape[0]
    for stride in numba.prange(STRIDES):  # scratch once per stride of rows, not per row
        keys, candidates = np.empty(count, np.int64), np.empty(count, np.int64)
        top_hist, hist = np.empty(2048, np.int32), np.empty(2048, np.int32)
        for i in range(stride, n, STRIDES):
            for c in range(count):
                keys[c] = _key(np.int64(bits[i, columns[c]]))
            _select_row(keys, count, k, m, out[i], columns, top_hist, hist, candidates)


if numba is not None:
    _key = numba.njit(inline="always")(_key)
    _nth_key = numba.njit(cache=True)(_nth_key)
    _select_row = numba.njit(cache=True)(_select_row)
    _select_kernel = numba.njit(parallel=True, cache=True)(_select_kernel)


def top_latents(pre: torch.Tensor, k: int, m: int, columns: torch.Tensor | None = None) -> torch.Tensor:
    """pre: (n, h) -> (n, m) latent ids: per row the top k (in no particular order), then the rest of the top m.

    columns: (c,) restricts the choice to those latents (AuxK's dead ones). Ties between equal values go
    to the lower column. The same sets as torch.topk, which it uses where its heap is faster or pre is not float32.
    """
    h = pre.shape[1] if columns is None else len(columns)
    if pre.dtype != torch.float32 or 64 * m <= h:
        values = pre if columns is None else pre[:, columns]
        top = values.topk(m, dim=1)  # sorted: the top k come first
        return top.indices if columns is None else columns[top.indices]
    out = torch.empty(len(pre), m, dtype=torch.int64)
    chosen = np.arange(h, dtype=np.int64) if columns is None else columns.numpy()
    _select_kernel(pre.detach().contiguous().numpy(), chosen, k, m, out.numpy())
    return out


def _decode_kernel(weight, indices, column_set, z, sums):
    """sums (sets, n, d) = per set s, sum over its columns j of z_ij W[idx_ij]; one sample per thread at a time."""
    zero = weight.dtype.type(0)
    for i in numba.prange(indices.shape[0]):
        sums[:, i] = zero
        for j in range(indices.shape[1]):
            zij = z[i, j]
            if zij != 0:
                out, w = sums[column_set[j], i], weight[indices[i, j]]
                for c in range(w.shape[0]):
                    out[c] += zij * w[c]


if numba is not None:
    _decode_kernel = numba.njit(parallel=True, fastmath=True, cache=True)(_decode_kernel)


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
        ctx.column_set = np.repeat(np.arange(len(widths)), widths)  # (m,) the code set of each column
        sums = weight.new_empty(len(widths), len(x), weight.shape[1])
        _decode_kernel(_array(weight), _array(indices), ctx.column_set, _array(z), sums.numpy())
        return (z, *sums.unbind())

    @staticmethod
    def backward(ctx, g_z, *g_sums):
        x, pre_bias, weight, indices, z = ctx.saved_tensors
        n, m = indices.shape
        grad_w, g_pre, grad_b = torch.empty_like(weight), z.new_empty(n, m), weight.new_empty(weight.shape[0])
        _backward_kernel(_array(weight), _array(x - pre_bias), _array(torch.stack(g_sums)), _array(indices), ctx.column_set,
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


# --- similarities of sparse codes, for the contrastive loss ---------------------------------------
# s_ij = sum over the latents r that q_i and d_j share of q_ir d_jr: each q non-zero meets only the d
# non-zeros on its latent (the d codes bucketed by latent), so the work is the number of shared
# non-zeros, where a zero-filled (dim, m) table costs dim m to build and sorts its indices in backward.


def _by_latent(dim, idx, val):
    """Codes idx, val (m, k) bucketed by latent: starts (dim + 1,), and per non-zero in bucket order its
    row (P,), its value (P,) and its flat position (P,)."""
    starts, order = _bucket(dim, idx.ravel())
    width = idx.shape[1]
    rows = order // width
    return starts, rows, val.ravel()[order], order


def _dots_kernel(q_idx, q_val, starts, rows, values, out):
    """out (n, m) = the dot products of the sparse q (n, k) codes and the d codes, given bucketed by _by_latent."""
    out[:] = 0
    for i in range(q_idx.shape[0]):
        for a in range(q_idx.shape[1]):
            r, v = q_idx[i, a], q_val[i, a]
            for p in range(starts[r], starts[r + 1]):
                out[i, rows[p]] += v * values[p]


def _dots_backward_kernel(q_idx, q_val, starts, rows, values, order, g_out, g_q, g_d):
    """The gradients of _dots_kernel's out against q_val and the d values (g_d: (m, k')), given g_out (n, m)."""
    g_q[:] = 0
    g_bucket = np.zeros(len(rows), g_out.dtype)  # d's gradient in bucket order, scattered back at the end
    for i in range(q_idx.shape[0]):
        for a in range(q_idx.shape[1]):
            r, v = q_idx[i, a], q_val[i, a]
            acc = g_q[i, a]
            for p in range(starts[r], starts[r + 1]):
                g = g_out[i, rows[p]]
                acc += g * values[p]
                g_bucket[p] += g * v
            g_q[i, a] = acc
    flat = g_d.ravel()
    for p in range(len(order)):
        flat[order[p]] = g_bucket[p]


if numba is not None:
    _by_latent = numba.njit(cache=True)(_by_latent)
    _dots_kernel = numba.njit(cache=True)(_dots_kernel)
    _dots_backward_kernel = numba.njit(cache=True)(_dots_backward_kernel)


class SparseDots(torch.autograd.Function):
    """(q_idx, q_val, d_idx, d_val, dim) -> (n, m) dot products of sparse codes: q (n, k), d (m, k'), int64 indices."""

    @staticmethod
    def forward(ctx, q_idx, q_val, d_idx, d_val, dim):
        ctx.save_for_backward(q_idx, q_val, d_val)
        ctx.buckets = _by_latent(dim, _array(d_idx), _array(d_val))  # the backward walks the same buckets
        out = q_val.new_empty(len(q_idx), len(d_idx))
        _dots_kernel(_array(q_idx), _array(q_val), *ctx.buckets[:3], out.numpy())
        return out

    @staticmethod
    def backward(ctx, g_out):
        q_idx, q_val, d_val = ctx.saved_tensors
        g_q, g_d = q_val.new_empty(q_val.shape), d_val.new_empty(d_val.shape)  # contiguous: the kernel writes through ravel()
        _dots_backward_kernel(_array(q_idx), _array(q_val), *ctx.buckets, _array(g_out), g_q.numpy(), g_d.numpy())
        return None, g_q, None, g_d, None


def sparse_dots(q_idx: torch.Tensor, q_val: torch.Tensor, d_idx: torch.Tensor, d_val: torch.Tensor, dim: int) -> torch.Tensor:
    """q (n, k) and d (m, k') sparse codes as indices and values in a space of `dim` -> (n, m) dot products."""
    return SparseDots.apply(q_idx.long(), q_val, d_idx.long(), d_val, dim)
