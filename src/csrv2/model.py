"""A head on disk: a folder of `config.json` (the six `SparseAutoEncoder` keys), `model.safetensors`
and `csrv2.json` (how csrv2 trained it). Writes are atomic; reads check everything first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .atomic import write_bytes, write_folder, write_json
from .codes import SparseCodes
from .config import HeadConfig, resolve_device
from .data.training import check_embeddings, load_array
from .errors import InputError
from .head import SparseHead, encode

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SETTINGS_FILE = "csrv2.json"
HEAD_KEYS = ("input_dim", "hidden_dim", "k", "k_aux", "normalize", "dead_threshold")
# Tensors sentence-transformers also writes for a SparseAutoEncoder (its tied decoder's alias of the
# encoder weight, and its dead-latent counter); csrv2 keeps training state out of models and ignores them.
FOREIGN_TENSORS = ("decoder.linear.weight", "stats_last_nonzero")
PICKLE_FILES = ("pytorch_model.bin", "model.pt", "model.pth", "checkpoint.pt", "checkpoint.pth")


def write_head_files(head: SparseHead, folder: Path, settings: dict | None = None) -> None:
    """Write the three files into an existing folder, each atomically (weights first)."""
    tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in head.named_parameters()}
    write_bytes(folder / WEIGHTS_FILE, save(tensors))
    write_json(folder / CONFIG_FILE, head.config.to_dict())
    if settings is not None:
        write_json(folder / SETTINGS_FILE, settings)


def save_head(head: SparseHead, folder: str | os.PathLike, settings: dict | None = None) -> Path:
    """Save a head as a model folder. A new folder appears whole (built aside, then renamed)."""
    folder = Path(folder)
    if folder.exists():
        write_head_files(head, folder, settings)
        return folder
    return write_folder(folder, lambda tmp: write_head_files(head, tmp, settings))


def read_settings(folder: str | os.PathLike) -> dict:
    """The folder's csrv2.json (how csrv2 trained the head), or {} for a head without one (e.g. from sentence-transformers)."""
    path = Path(folder) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_head_config(folder: Path) -> HeadConfig:
    """The folder's `HeadConfig`, or an `InputError` saying why the folder is not a csrv2 head."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such model folder; pass the --out folder of `csrv2 train`")
    if (folder / "modules.json").is_file():
        raise InputError(
            f"{folder}: is a sentence-transformers model folder, not a csrv2 head; pass the folder of its SparseAutoEncoder module"
        )
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{folder}: has no {CONFIG_FILE}; a csrv2 model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: is not valid JSON ({e}); save the model again with csrv2") from e
    if not isinstance(cfg, dict) or set(cfg) != set(HEAD_KEYS):
        found = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise InputError(
            f"{path}: has keys {found}, not a sparse head's {list(HEAD_KEYS)}; this folder comes from another tool"
        )
    try:
        return HeadConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: invalid head config ({e}); save the model again with csrv2") from e


def load_head(folder: str | os.PathLike, device: torch.device | str = "cpu") -> SparseHead:
    """Load a model folder written by `save_head` (or a `SparseAutoEncoder` module folder)."""
    folder = Path(folder)
    config = read_head_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickles = [name for name in PICKLE_FILES if (folder / name).exists()]
        hint = f" (found {pickles[0]}, a pickle, which csrv2 never loads)" if pickles else ""
        raise InputError(f"{folder}: has no {WEIGHTS_FILE}{hint}; csrv2 reads weights only from safetensors")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic[:1] == b"\x80" or magic == b"PK":
            raise InputError(f"{path}: is a pickle/torch.save file, not safetensors; csrv2 never loads pickles, convert it with safetensors.torch.save_file") from e
        raise InputError(f"{path}: is not a readable safetensors file ({e}); save the model again with csrv2") from e
    if "encoder.weight" not in tensors and "decoder.linear.weight" in tensors:
        # sentence-transformers saves the tied weight once, sometimes under the decoder's name
        tensors["encoder.weight"] = tensors["decoder.linear.weight"]
    head = SparseHead(config)
    expected = {name: tuple(p.shape) for name, p in head.named_parameters()}
    found = {name: tuple(t.shape) for name, t in tensors.items() if name not in FOREIGN_TENSORS}
    if found != expected:
        raise InputError(f"{path}: holds tensors {found}, but {CONFIG_FILE} implies {expected}; the files do not belong together")
    head.load_state_dict({name: tensors[name] for name in expected})
    return head.to(device).eval()


def encode_file(folder: str | os.PathLike, embeddings: str | os.PathLike, k: int | None = None, *, batch_size: int = 4096,
                device: str = "auto", progress: bool | None = None) -> SparseCodes:
    """Encode the (n, d) embeddings of a .npy file (or the array 'embeddings' of an .npz) with the model folder's head.

    The array is checked before the model is loaded: no rows, a non-float dtype or non-finite values
    raise `InputError`, as they do for training.
    """
    x = load_array(embeddings)
    if x.ndim >= 1 and x.shape[0] == 0:
        raise InputError(f"{embeddings}: has no rows (shape {x.shape}); pass a file with at least one embedding")
    check_embeddings(x, "embeddings")
    return encode(load_head(folder, resolve_device(device)), x, k, batch_size=batch_size, progress=progress)
