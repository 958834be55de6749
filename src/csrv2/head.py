"""The CSR sparse head: a TopK sparse autoencoder with a decoder tied to its encoder, and `encode`, which
turns (n, input_dim) embeddings into `SparseCodes` batch by batch.

    pre   = W (x - b_pre) + b_lat              (batch, hidden_dim)
    z     = ReLU(TopK_k(pre))                  k non-zeros per row at most
    x_hat = W^T z + b_pre                      (batch, input_dim)

Parameters carry sentence-transformers' `SparseAutoEncoder` names and shapes: `pre_bias` (d,),
`encoder.weight` (h, d), `latent_bias` (h,). The head holds no training state: the trainer keeps the
dead-latent counters, and `encode(x, k)` takes k as an argument.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .codes import SparseCodes
from .config import HeadConfig, check_k
from .data.training import check_finite_rows
from .errors import InputError


def parameter_shapes(config: HeadConfig) -> dict[str, tuple[int, ...]]:
    """The shapes of a head's parameters by name: what a model file must hold for this config."""
    return {"pre_bias": (config.input_dim,), "encoder.weight": (config.hidden_dim, config.input_dim), "latent_bias": (config.hidden_dim,)}


class SparseHead(nn.Module):
    """TopK sparse autoencoder from `input_dim` to `hidden_dim` latents.

    Initialisation: biases are zero; each row of W (one latent's encoder direction and, tied, its
    decoder atom) is a Gaussian vector scaled to unit norm. Equal-norm rows mean no latent is favoured
    by the top-k at step 0 merely for having a larger row, which keeps early selection spread out
    (nn.Linear's uniform init gives rows of unequal norm).
    """

    def __init__(self, config: HeadConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        d, h = config.input_dim, config.hidden_dim
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.encoder = nn.Linear(d, h, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(h))
        with torch.no_grad():
            w = torch.randn(h, d, generator=generator)
            self.encoder.weight.copy_(w / w.norm(dim=1, keepdim=True))

    @property
    def weight(self) -> torch.Tensor:
        """W: (hidden_dim, input_dim); row j is latent j's encoder direction and decoder atom."""
        return self.encoder.weight

    def digest(self) -> str:
        """sha256 (64 hex digits) of `normalize` and the parameters' names, shapes and float32 bytes: the head's identity.

        Equal for a head saved and loaded again (or moved between devices and dtypes that hold its values
        exactly); different for another head of the same shape, whose codes would use other latents, and
        for the same weights with input standardisation switched (other codes too).
        """
        h = hashlib.sha256(f"normalize={self.config.normalize};".encode())
        for name, tensor in sorted(self.named_parameters()):
            h.update(f"{name}{list(tensor.shape)};".encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def standardize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x: (batch, input_dim) -> (x', mu, std); identity unless config.normalize (as in sentence-transformers)."""
        if not self.config.normalize:
            return x, None, None
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        return (x - mu) / (std + 1e-5), mu, std

    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, input_dim) -> pre: (batch, hidden_dim) = W (x' - b_pre) + b_lat, x' = standardize(x)."""
        return self.project(self.standardize(x)[0])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized x: (batch, input_dim) -> (batch, hidden_dim) = W (x - b_pre) + b_lat; the one encoder product.

        Autograd through `x - b_pre` would compute the full (batch, hidden_dim) x (hidden_dim,
        input_dim) product G W just to sum it into b_pre's gradient, -W^T sum_i g_i. Here the product
        reads a detached b_pre and b_pre's gradient flows through W_detached (b_pre_detached - b_pre),
        which is exactly zero in value and costs one matrix-vector product in the backward pass.
        """
        w, b = self.encoder.weight, self.pre_bias
        if not torch.is_grad_enabled():
            return F.linear(x - b, w, self.latent_bias)
        return F.linear(x - b.detach(), w, self.latent_bias + w.detach() @ (b.detach() - b))

    def decode(
        self, indices: torch.Tensor, values: torch.Tensor, *, bias: bool = True, std: torch.Tensor | None = None,
        mu: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sparse codes -> reconstruction W^T z + b_pre; small k gathers only the k rows of W each code uses.

        indices: (batch, k) int, values: (batch, k) float -> (batch, input_dim). `bias=False` leaves
        out b_pre; `std`/`mu` (batch, 1) undo `standardize`.
        """
        return self.unstandardize(self.decode_sums([(indices, values)])[0], std, mu, bias=bias)

    def unstandardize(self, sums: torch.Tensor, std=None, mu=None, *, bias: bool = True) -> torch.Tensor:
        """W^T z sums: (batch, input_dim) -> reconstruction (W^T z + b_pre) std + mu; `bias=False` keeps
        b_pre and mu out (a residual); std/mu (batch, 1) from `standardize`, None when it is the identity."""
        out = sums + self.pre_bias if bias else sums
        if std is not None:
            out = out * std
        if mu is not None and bias:
            out = out + mu
        return out

    def decode_sums(self, codes: list[tuple[torch.Tensor, torch.Tensor]], gathered: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """W^T z for several code sets at once: [(indices (batch, k_i), values (batch, k_i))] -> [(batch, input_dim)].

        gathered[i]: set i is decoded by gathering its rows of W (True; every set by default) or zero-filled
        (False); which is cheaper depends on its width and the device, so the caller says (objective.gather_pays).
        The gathered sets share one embedding_bag, so the backward pass builds W's gradient once for them;
        the zero-filled ones share one (sets * batch, hidden_dim) x (hidden_dim, input_dim) product.
        """
        batch, h, weight = codes[0][0].shape[0], self.config.hidden_dim, self.encoder.weight
        gathered = [True] * len(codes) if gathered is None else list(gathered)
        if len(gathered) != len(codes):
            raise ValueError(f"decode_sums got {len(codes)} code sets but {len(gathered)} gathered flags; pass one flag per set")
        out: list[torch.Tensor | None] = [None] * len(codes)
        dense = [i for i, g in enumerate(gathered) if not g]
        if dense:
            z = torch.cat([torch.zeros(batch, h, dtype=codes[i][1].dtype, device=weight.device).scatter(1, *codes[i]) for i in dense])
            for i, part in zip(dense, (z @ weight).split(batch), strict=True):  # z: (len(dense) * batch, hidden_dim)
                out[i] = part
        bags = [i for i, g in enumerate(gathered) if g]
        if bags:
            widths = [codes[i][0].shape[1] for i in bags]
            flat_idx = torch.cat([codes[i][0].reshape(-1) for i in bags]).long()
            flat_val = torch.cat([codes[i][1].reshape(-1) for i in bags])
            # one bag per (set, row); widths are Python ints, so the offsets need no device round trip
            starts = [0]
            for width in widths:
                starts.append(starts[-1] + batch * width)
            offsets = torch.cat([torch.arange(start, end, width, device=flat_idx.device)
                                 for start, end, width in zip(starts[:-1], starts[1:], widths, strict=True)])
            sums = F.embedding_bag(flat_idx, weight, offsets, mode="sum", per_sample_weights=flat_val)
            for i, part in zip(bags, sums.split(batch), strict=True):
                out[i] = part
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, input_dim) -> (indices (batch, k) int64, values (batch, k) float32), largest first.

        Values are ReLU(TopK_k(pre)): a row has fewer than k non-zeros only where a top-k
        pre-activation is negative. Any k <= hidden_dim works; nothing is mutated.
        """
        k = self.config.k if k is None else k
        check_k(k, self.config.hidden_dim)
        if x.ndim != 2 or x.shape[1] != self.config.input_dim:
            raise ValueError(
                f"embeddings have shape {tuple(x.shape)} but the head expects (n, {self.config.input_dim}); "
                "encode embeddings from the backbone the head was trained on"
            )
        top = self.preactivations(x.to(self.pre_bias.dtype)).topk(k, dim=-1)
        return top.indices, top.values.relu()


def encode(
    head: SparseHead,
    embeddings: np.ndarray | torch.Tensor,
    k: int | None = None,
    *,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> SparseCodes:
    """Encode (n, input_dim) float embeddings (an array, memory map or tensor) into k-sparse codes.

    Batched so memory stays bounded; shows a progress bar when there is more than one batch
    (`progress=None`) or when asked. Raises `InputError` on a wrong dimension or dtype, no rows,
    values that are not finite in float32 (NaN, Inf, or float64 beyond float32's range), and on codes
    that would not be finite, so no NaN code is ever returned.
    """
    k = head.config.k if k is None else k
    check_k(k, head.config.hidden_dim)
    batches = _batches(head, embeddings, batch_size, device, progress, "encode")
    indices = np.empty((len(embeddings), k), dtype=np.int32)
    values = np.empty((len(embeddings), k), dtype=np.float32)
    for start, batch in batches:
        idx, val = head.encode(batch, k)
        indices[start : start + len(batch)] = idx.cpu().numpy()
        values[start : start + len(batch)] = _finite(val.float(), start).cpu().numpy()
    return SparseCodes(indices, values, head.config.hidden_dim)


def project(
    head: SparseHead,
    embeddings: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """The dense side of asymmetric search: (n, input_dim) embeddings -> (n, hidden_dim) float32 rows u = W (x' - b_pre).

    u . v = (x' - b_pre) . (W^T v) for any code v: the query, centred as the encoder centres it, against
    the code decoded without the pre-bias. Scored by an index against stored document codes it ranks
    documents by their decoded codes, with no TopK on the query side (`InvertedIndex.search` takes
    these rows as dense queries). x' is x standardised when the head normalises its input. Checks and
    batches as `encode`.
    """
    batches = _batches(head, embeddings, batch_size, device, progress, "project")
    out = np.empty((len(embeddings), head.config.hidden_dim), dtype=np.float32)
    for start, batch in batches:
        with torch.no_grad():
            u = F.linear(head.standardize(batch.to(head.pre_bias.dtype))[0] - head.pre_bias, head.weight)
        out[start : start + len(batch)] = _finite(u.float(), start).cpu().numpy()
    return out


def _batches(head: SparseHead, embeddings, batch_size: int, device, progress: bool | None, desc: str):
    """The checks `encode` documents, then an iterator of (start, (b, input_dim) float32 batch on the head's device)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if embeddings.ndim != 2 or embeddings.shape[1] != head.config.input_dim:
        raise InputError(
            f"embeddings have shape {tuple(embeddings.shape)} but the model expects (n, {head.config.input_dim}); "
            "encode embeddings made by the backbone the model was trained on"
        )
    dtype = embeddings.dtype
    if not (dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.issubdtype(dtype, np.floating)):
        raise InputError(f"embeddings have dtype {dtype}; embeddings must be float16/32/64")
    n = embeddings.shape[0]
    if n == 0:
        raise InputError("embeddings has no rows; pass at least one embedding")
    device = torch.device(device) if device is not None else head.pre_bias.device
    head.to(device)
    starts = range(0, n, batch_size)
    show = len(starts) > 1 if progress is None else progress

    def batches():  # a generator inside, so that the checks above run when `_batches` is called
        for start in tqdm(starts, desc=desc, unit="batch", disable=not show):
            rows = embeddings[start : start + batch_size]
            batch = float32_rows(rows)
            check_finite_rows(rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows), batch.cpu().numpy(),
                              "embeddings", start)
            yield start, batch.to(device)

    return batches()


def _finite(out: torch.Tensor, start: int) -> torch.Tensor:
    """out (b, m) unchanged; `InputError` naming the first row (counted from `start`) with a non-finite value."""
    if not torch.isfinite(out).all():
        bad = start + int((~torch.isfinite(out).all(dim=1)).nonzero()[0])
        raise InputError(
            f"embeddings row {bad} gives non-finite codes: the model's pre-activations overflow float32; "
            "check that the model's weights and the embeddings have ordinary magnitudes"
        )
    return out


def float32_rows(rows: np.ndarray | torch.Tensor) -> torch.Tensor:
    """rows: (b, d) float array or tensor -> (b, d) float32 tensor; values beyond float32's range become inf (no warning)."""
    if isinstance(rows, torch.Tensor):
        return rows.float()
    with np.errstate(over="ignore"):  # the overflow is reported by data.training.check_finite_rows, naming the row
        return torch.from_numpy(np.array(rows, dtype=np.float32))
