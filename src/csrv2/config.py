"""Settings, one frozen dataclass per concern.

`HeadConfig` holds the sparse head's shape with sentence-transformers' `SparseAutoEncoder` keys, so
a head's `config.json` is that module's config. `TrainConfig` holds everything the trainer reads.
A field's docstring (the string literal below it) is its documentation and becomes the CLI's `--help`.
Cross-field checks raise `ValueError` naming the fields; configs are never mutated at run time.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch

CONTRASTIVE_MODES = ("auto", "unlabelled", "supervised", "pairs", "self", "none")
PRESETS = ("csrv2", "csr")
DEFAULT_EPOCHS = 50
DEFAULT_QUERY_K = 32  # latents of a query code in asymmetric search (search/queries.py)
"""Head-only training budget of `csrv2 train`, `csrv2.train` and `csrv2 reproduce`: 50 beat 20 on the suite's validation splits at k = 2
(CSRv2-linear, docs/benchmarks.md). End-to-end training keeps its own smaller budget (finetune.py)."""
MRL_DIMS = (2, 4, 8, 16, 32, 64)
"""Nested prefix sizes of the Matryoshka (MRL) peers: the linear head on frozen embeddings and the finetuned backbone."""

# The largest head csrv2 builds, in weights: 8 GiB of float32, 24 GiB with Adam's two moments; a larger one would
# fail (or swap) only when allocated, after the data were read.
MAX_WEIGHTS = 2**31


@dataclass(frozen=True)
class HeadConfig:
    """Shape of a TopK sparse head; the six keys of sentence-transformers' `SparseAutoEncoder`."""

    input_dim: int
    """Dimension d of the dense embeddings the head reads."""
    hidden_dim: int = 0
    """Number of latents h (0 = 4 x input_dim, the paper's default)."""
    k: int = 8
    """Non-zero latents per code: the target k of training and the default k of encoding."""
    k_aux: int = 0
    """Dead latents the AuxK loss uses to model the residual (0 = hidden_dim / 16, i.e. 1024 at h = 16384 as in the paper)."""
    normalize: bool = False
    """Standardise each input (subtract its mean, divide by its std) before encoding; off in the paper."""
    dead_threshold: int = 30
    """A latent is dead when it has not fired in the top-k for more than this many optimizer steps."""

    def __post_init__(self) -> None:
        check_int("input_dim", self.input_dim, 1)
        for name in ("hidden_dim", "k_aux", "dead_threshold"):  # 0 is the default for the first two
            check_int(name, getattr(self, name), 0)
        check_bool("normalize", self.normalize)
        # Defaults that depend on other fields are resolved here, once, so a saved config is explicit.
        if self.hidden_dim == 0:
            object.__setattr__(self, "hidden_dim", 4 * self.input_dim)
        if self.k_aux == 0:
            object.__setattr__(self, "k_aux", max(1, self.hidden_dim // 16))
        if self.hidden_dim * self.input_dim > MAX_WEIGHTS:
            raise ValueError(f"hidden_dim x input_dim = {self.hidden_dim} x {self.input_dim} weights, above the 2**31 a head may have "
                             f"(8 GiB of float32, three times that to train); pass a hidden_dim of at most {MAX_WEIGHTS // self.input_dim}")
        check_k(self.k, self.hidden_dim, "k")
        if not 1 <= self.k_aux <= self.hidden_dim:
            raise ValueError(f"k_aux must be in [1, hidden_dim={self.hidden_dim}], got {self.k_aux}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_k(k: int, hidden_dim: int, name: str = "k") -> None:
    """Raise a one-line `ValueError` unless 1 <= k <= hidden_dim."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= hidden_dim:
        raise ValueError(f"{name} must be an integer in [1, hidden_dim={hidden_dim}], got {k!r}")


def check_int(name: str, value, minimum: int) -> None:
    """Raise a one-line `ValueError` unless value is an integer (a bool or a float is not) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_finite(name: str, value) -> None:
    """Raise a one-line `ValueError` unless value is a finite real number (not NaN, not Inf, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How a head is trained. Defaults are the paper's text recipe (docs/method.md)."""

    epochs: int = DEFAULT_EPOCHS
    """Passes over the training data; the head-only default was chosen on the suite's validation splits at k = 2."""
    batch_size: int = 128
    """Samples (or query/document pairs) per optimizer step."""
    lr: float = 1e-4
    """Adam learning rate, constant."""
    adam_eps: float = 6.25e-10
    """Adam epsilon (the official recipe's value)."""
    anneal: bool = True
    """Progressive k-annealing: k goes linearly from k_init to the head's k over decay_ratio of the steps."""
    k_init: int | None = None
    """Starting k of annealing (default 64, capped at hidden_dim / 4 and raised to k); an explicit value below k is an error."""
    decay_ratio: float = 0.7
    """Fraction of all optimizer steps after which k has reached its target."""
    multi_k_coef: float = 0.125
    """Weight of the reconstruction from the top-4k latents."""
    aux_coef: float = 0.1
    """beta: weight of the AuxK loss on dead latents."""
    cl_coef: float = 0.1
    """gamma: weight of the contrastive loss on the k-sparse codes."""
    temperature: float | None = None
    """Temperature of the contrastive loss (cosine / temperature); default: 0.05 for the pairs loss at k >= 8, else 0.2."""
    contrastive: Literal["auto", "unlabelled", "supervised", "pairs", "self", "none"] = "auto"
    """Contrastive form: auto picks supervised with labels, pairs with documents, else self; unlabelled (CSR v1) ignores labels."""
    seed: int = 0
    """Seed of the weight initialisation and the data order."""
    device: str = "auto"
    """Device to train on: auto (the accelerator if there is one, else cpu), cpu, cuda, cuda:1, mps."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every this many optimizer steps (0 = at the end of each epoch)."""
    log_every: int = 10
    """Write a JSON log line and refresh the progress bar every this many optimizer steps."""
    tf32: bool = True
    """On CUDA, run float32 matrix products on TF32 tensor cores (about 1e-3 relative error per product; several times faster)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every"):
            check_int(name, getattr(self, name), 1)
        for name in ("checkpoint_every", "seed"):  # the data order's generator takes no negative seed
            check_int(name, getattr(self, name), 0)
        if self.k_init is not None:
            check_int("k_init", self.k_init, 1)
        for name in ("anneal", "tf32"):
            check_bool(name, getattr(self, name))
        temperature = () if self.temperature is None else ("temperature",)  # None: chosen by the contrastive form and k
        for name in ("lr", "adam_eps", "decay_ratio", "multi_k_coef", "aux_coef", "cl_coef", *temperature):
            check_finite(name, getattr(self, name))
        if not 0 < self.decay_ratio <= 1:
            raise ValueError(f"decay_ratio must be in (0, 1], got {self.decay_ratio}")
        for name in ("lr", "adam_eps", *temperature):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("multi_k_coef", "aux_coef", "cl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.contrastive not in CONTRASTIVE_MODES:
            raise ValueError(f"contrastive must be one of {', '.join(CONTRASTIVE_MODES)}, got {self.contrastive!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def preset(name: str, **overrides) -> TrainConfig:
    """The `TrainConfig` of a named recipe, with any field overridden.

    csrv2: k-annealing on, contrastive `auto` (supervised with labels, pairs with documents, else self).
    csr:   the CSR v1 baseline: fixed k, contrastive `unlabelled` (pairs with documents, else self; CSR v1 reads no labels).
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    base = {"csrv2": {"anneal": True, "contrastive": "auto"}, "csr": {"anneal": False, "contrastive": "unlabelled"}}[name]
    return TrainConfig(**{**base, **overrides})


# The paper's vision recipe, which images train with (the suite's image rows, `csrv2 finetune` on images): a head lr of
# 4e-4 and an AuxK weight of 1/32. Its batch of 4,096 exceeds these machines' image train splits, so batches stay.
VISION_RECIPE = {"lr": 4e-4, "aux_coef": 1 / 32}

TEMPERATURE = 0.2  # the paper's
PAIRS_TEMPERATURE, PAIRS_TEMPERATURE_K = 0.05, 8


def resolve_temperature(temperature: float | None, mode: str, k: int | None) -> float:
    """The contrastive temperature a run uses: `temperature` when given; else PAIRS_TEMPERATURE (0.05) for the pairs loss at
    k >= PAIRS_TEMPERATURE_K (8), and TEMPERATURE (0.2) otherwise (k None: a dense head).

    Why (validation splits): at 0.2 the pairs loss cannot saturate (logits within +-5), so once the training pairs are
    apart it keeps pushing codes of other pairs towards cosine 0, i.e. disjoint supports; with ReLU after TopK the cheapest
    way is negative pre-activations, and a k = 64 head ended with 22 non-zeros and a worse score than at k = 32. At 0.05
    the loss saturates and every k keeps its k non-zeros; at k = 2 it lost retrieval quality, and labelled data keep 0.2.
    """
    if temperature is not None:
        return temperature
    return PAIRS_TEMPERATURE if mode == "pairs" and k is not None and k >= PAIRS_TEMPERATURE_K else TEMPERATURE


DEFAULT_K_INIT = 64


def resolve_k_init(k_init: int | None, k: int, hidden_dim: int) -> int:
    """Starting k of annealing: k_init (default 64) capped at hidden_dim // 4 so that 4k fits, and >= k.

    An explicit k_init below k is a mistake and raises; the default is silently raised to k.
    """
    if k_init is not None and k_init < k:
        raise ValueError(f"k_init ({k_init}) must be >= k ({k}): annealing goes from k_init down to k")
    return max(min(k_init or DEFAULT_K_INIT, max(1, hidden_dim // 4)), k)


def resolve_device(spec: str | None = "auto") -> torch.device:
    """A `torch.device` from a name; "auto" (or None) is the machine's accelerator if it has one, else cpu."""
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if spec in (None, "auto"):
        return accelerator if accelerator is not None else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"device {spec!r} is not a device name ({e}); use auto, cpu, cuda, cuda:N or mps") from e
    if device.type != "cpu" and (accelerator is None or accelerator.type != device.type):
        raise ValueError(f"device {spec!r} is not available on this machine; use auto or cpu")
    return device


def field_docs(cls) -> dict[str, str]:
    """Map each dataclass field of `cls` to the docstring written under it in the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):  # each node with the one after it
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


__all__ = [
    "CONTRASTIVE_MODES",
    "DEFAULT_EPOCHS",
    "DEFAULT_QUERY_K",
    "MRL_DIMS",
    "PRESETS",
    "HeadConfig",
    "TrainConfig",
    "check_bool",
    "check_finite",
    "check_int",
    "check_k",
    "field_docs",
    "preset",
    "resolve_temperature",
    "resolve_device",
    "resolve_k_init",
]
