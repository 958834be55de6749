"""A head on disk: a folder of `config.json` (the six `SparseAutoEncoder` keys), `model.safetensors`
and `csrv2.json` (how csrv2 trained it). Writes are atomic; reads check everything first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .atomic import write_bytes, write_folder, write_json
from .codes import SparseCodes
from .config import HeadConfig, resolve_device
from .data.training import load_array
from .errors import InputError
from .head import SparseHead, encode, parameter_shapes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SETTINGS_FILE = "csrv2.json"
HEAD_KEYS = ("input_dim", "hidden_dim", "k", "k_aux", "normalize", "dead_threshold")
# Tensors sentence-transformers also writes for a SparseAutoEncoder (its tied decoder's alias of the
# encoder weight, and its dead-latent counter); csrv2 keeps training state out of models and ignores them.
FOREIGN_TENSORS = ("decoder.linear.weight", "stats_last_nonzero")
PICKLE_FILES = ("pytorch_model.bin", "model.pt", "model.pth", "checkpoint.pt", "checkpoint.pth")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_JSON_BYTES = 1 << 20  # a head's config.json is about 150 bytes and its csrv2.json a few KB


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
    if not path.is_file():
        return {}
    settings = read_json(path)
    if not isinstance(settings, dict):
        raise InputError(f"{path}: holds a JSON {type(settings).__name__}, not an object of settings; save the model again with csrv2")
    return settings


def read_json(path: Path) -> object:
    """A small JSON file, or an `InputError`; the size is checked first, so a huge file is never read."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise InputError(f"{path}: is {size} bytes, more than a model's JSON ever is ({MAX_JSON_BYTES}); it comes from another tool")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, or an integer with too many digits
        raise InputError(f"{path}: is not valid JSON ({e}); save the model again with csrv2") from e


def json_text(value: object, limit: int = 40) -> str:
    """value as JSON spells it (true, null, "128", Infinity), cut to `limit` characters for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_config_types(cfg: dict, path: Path) -> None:
    """Raise `InputError` unless each head key has its JSON type: a whole number (not true, 128.0 or "128"); normalize a boolean."""
    for key in HEAD_KEYS:
        value = cfg[key]
        if key == "normalize":
            if not isinstance(value, bool):
                raise InputError(f'{path}: "{key}" is {json_text(value)}, not a boolean; write true or false')
        elif isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f'{path}: "{key}" is {json_text(value)}, not a whole number; write an integer, no quotes or decimal point')


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
    cfg = read_json(path)
    if not isinstance(cfg, dict) or set(cfg) != set(HEAD_KEYS):
        found = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise InputError(
            f"{path}: has keys {found}, not a sparse head's {list(HEAD_KEYS)}; this folder comes from another tool"
        )
    check_config_types(cfg, path)
    try:
        return HeadConfig(**cfg)
    except ValueError as e:
        raise InputError(f"{path}: invalid head config ({e}); save the model again with csrv2") from e


def is_pickle(path: Path) -> bool:
    """Whether the file starts as a pickle (protocol 2+) or a torch.save zip archive does."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError:
        return False
    return magic[:1] == b"\x80" or magic == b"PK"


def read_weights(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors `expected` names (name -> shape) from a safetensors file, as float32.

    The header (names, dtypes, shapes) is checked against `expected` before any tensor is read, and
    safetensors checks that the header's shapes fit the file, so what is allocated is bounded by the
    file's size and by what the config implies. A pickle is refused, never unpickled.
    """
    try:
        f = safe_open(str(path), "pt")
    except (SafetensorError, OSError) as e:
        if is_pickle(path):
            raise InputError(
                f"{path}: is a pickle/torch.save file, not safetensors; csrv2 never loads pickles, "
                "convert it with safetensors.torch.save_file"
            ) from e
        raise InputError(f"{path}: is not a readable safetensors file ({e}); save the model again with csrv2") from e
    with f:
        names = set(f.keys())
        sources = {name: name for name in names if name not in FOREIGN_TENSORS}
        if "encoder.weight" not in sources and "decoder.linear.weight" in names:
            # sentence-transformers saves the tied weight once, sometimes under the decoder's name
            sources["encoder.weight"] = "decoder.linear.weight"
        found = {name: tuple(f.get_slice(source).get_shape()) for name, source in sources.items()}
        if found != expected:
            raise InputError(f"{path}: holds tensors {found}, but {CONFIG_FILE} implies {expected}; the files do not belong together")
        for source in sources.values():
            dtype = f.get_slice(source).get_dtype()
            if dtype not in FLOAT_DTYPES:
                raise InputError(f"{path}: tensor {source} is {dtype}, not {'/'.join(FLOAT_DTYPES)}; save the model again with csrv2")
        tensors = {name: f.get_tensor(source).to(torch.float32) for name, source in sources.items()}
    if not all(torch.isfinite(t).all() for t in tensors.values()):  # checked after the cast: a float64 1e300 is inf in float32
        raise InputError(f"{path}: has non-finite weights (NaN or Inf); it cannot encode anything meaningful; train it again")
    return tensors


def load_head(folder: str | os.PathLike, device: torch.device | str = "cpu") -> SparseHead:
    """Load a model folder written by `save_head` (or a `SparseAutoEncoder` module folder) onto `device` (a name such as
    "auto", "cpu", "cuda:1", or a torch.device).

    Everything is checked before anything of the config's size is allocated: the config's keys and
    types, then the weights' names, dtypes and shapes from the safetensors header, then their values
    (all finite). A model with NaN or Inf weights is refused, so a diverged checkpoint cannot be
    encoded with or resumed.
    """
    folder = Path(folder)
    config = read_head_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickles = [name for name in PICKLE_FILES if (folder / name).exists()]
        hint = f" (found {pickles[0]}, a pickle, which csrv2 never loads)" if pickles else ""
        raise InputError(f"{folder}: has no {WEIGHTS_FILE}{hint}; csrv2 reads weights only from safetensors")
    tensors = read_weights(path, parameter_shapes(config))  # checked before a head of the config's size is built
    head = SparseHead(config)
    head.load_state_dict(tensors)
    return head.to(resolve_device(str(device))).eval()


def encode_file(head: SparseHead, embeddings: str | os.PathLike, k: int | None = None, *, batch_size: int = 4096,
                progress: bool | None = None) -> SparseCodes:
    """Encode the (n, d) embeddings of a .npy file (or the array 'embeddings' of an .npz) with `head`;
    `encode` refuses no rows, a non-float dtype and non-finite values before any code is made."""
    return encode(head, load_array(embeddings), k, batch_size=batch_size, progress=progress)
