"""sentence-transformers format: a backbone + csrv2 head as a folder `SparseEncoder(path)` loads, and back.

The folder is the backbone's own modules followed by a `SparseAutoEncoder` module holding the head
(config with exactly its six keys, weights in safetensors), written by sentence-transformers itself;
csrv2's training settings go to a separate `csrv2.json` at the top. The folder names cosine as its similarity,
what csrv2 trains and scores codes with (sentence-transformers scores a SparseEncoder that names none by dot product).
Reading goes the other way: any SparseEncoder folder whose last module is a SparseAutoEncoder (csrv2's or one
published by others) gives its backbone and a csrv2 `SparseHead`, and `sparse_encoder_similarity` its similarity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from .atomic import write_folder, write_json
from .data.backbones import SAFE_MODEL_KWARGS, TextBackbone, check_safetensors_only, read_modules
from .errors import InputError
from .head import SparseHead
from .model import SETTINGS_FILE, load_head

SAE_TYPE = "sentence_transformers.sparse_encoder.modules.sparse_auto_encoder.SparseAutoEncoder"
SIMILARITY = "cosine"  # of the codes: the contrastive losses' similarity and retrieval_metrics' ranking
ST_CONFIG = "config_sentence_transformers.json"  # where sentence-transformers keeps a model's similarity_fn_name


def to_sparse_encoder(backbone: TextBackbone, head: SparseHead):
    """An in-memory SparseEncoder: the backbone's modules, then a SparseAutoEncoder with the head's weights."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder

    if backbone.dim != head.config.input_dim:
        raise InputError(
            f"the head reads {head.config.input_dim}-d embeddings but {backbone.name} makes {backbone.dim}-d; "
            "export it with its own backbone"
        )
    sae = SparseAutoEncoder(**head.config.to_dict())
    missing, unexpected = sae.load_state_dict({name: p.detach().cpu() for name, p in head.named_parameters()}, strict=False)
    if unexpected or set(missing) - {"stats_last_nonzero", "decoder.linear.weight"}:
        raise RuntimeError(f"SparseAutoEncoder's parameters changed (missing {missing}, unexpected {unexpected})")
    return SparseEncoder(modules=[*backbone.model, sae], device="cpu", similarity_fn_name=SIMILARITY)


def export_sparse_encoder(head: SparseHead, out: str | os.PathLike, backbone: TextBackbone | None = None, *,
                          settings: dict | None = None, overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """Write backbone + head to the folder `out` in the sentence-transformers SparseEncoder format
    (whole or not at all, see `write_folder`); extra(folder) may add files before it appears."""
    model = to_sparse_encoder(backbone or TextBackbone(), head)

    def fill(tmp: Path) -> None:
        model.save(str(tmp))
        write_json(tmp / SETTINGS_FILE, {"head": head.config.to_dict(), **(settings or {})})
        if extra is not None:
            extra(tmp)

    return write_folder(out, fill, overwrite)


def read_sparse_encoder(folder: str | os.PathLike) -> tuple[TextBackbone, SparseHead]:
    """The backbone (every module before the head) and the head of a SparseEncoder folder.

    `InputError` when the folder is not a sentence-transformers model, does not end in a
    SparseAutoEncoder, that module's config has other keys than its six, or a module's weights
    are only in a pickle (csrv2 loads weights only from safetensors).
    """
    folder = Path(folder)
    modules = read_modules(folder)
    if not modules or modules[-1].get("type") != SAE_TYPE:
        last = modules[-1].get("type") if modules else "missing"
        raise InputError(f"{folder}: its last module is {last}, not a SparseAutoEncoder; pass a CSR/CSRv2 SparseEncoder folder")
    head = load_head(folder / modules[-1]["path"])  # checks the six keys and the safetensors weights
    check_safetensors_only(folder)
    from sentence_transformers import SentenceTransformer, SparseEncoder

    encoder = SparseEncoder(str(folder), device="cpu", local_files_only=True, model_kwargs=SAFE_MODEL_KWARGS)
    return TextBackbone.from_model(SentenceTransformer(modules=list(encoder)[:-1], device="cpu"), str(folder)), head


def sparse_encoder_similarity(folder: str | os.PathLike) -> str:
    """The similarity sentence-transformers scores a SparseEncoder folder's codes with: the `similarity_fn_name` of
    its config_sentence_transformers.json, dot product when it names none (as SparseEncoder reads it)."""
    path = Path(folder) / ST_CONFIG
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e}); save the model with sentence-transformers") from e
    return (config.get("similarity_fn_name") if isinstance(config, dict) else None) or "dot"


__all__ = ["export_sparse_encoder", "read_sparse_encoder", "sparse_encoder_similarity", "to_sparse_encoder"]
