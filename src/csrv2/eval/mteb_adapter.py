"""Score csrv2 representations with MTEB's own tasks and evaluators (mteb >= 2.26).

texts -> embed -> dense (n, d) -> transform -> what MTEB scores (n, m)

`CSRv2Encoder` is an MTEB encoder (`mteb.models.abs_encoder.AbsEncoder`): MTEB hands it a DataLoader of text
batches, it returns one float32 row per text, scored by cosine. The factories cover the three
representations csrv2 compares: the backbone itself, a Matryoshka-style truncation, and a sparse
head's k-sparse codes. MTEB's evaluators take dense arrays, so codes are zero-filled to
(n, hidden_dim) float32: memory is 4 hidden_dim bytes per text, not the index's few bytes.

Online (mteb downloads the tasks' data from the Hugging Face hub):

    import mteb
    import csrv2
    from csrv2.data.backbones import TextBackbone
    from csrv2.eval.mteb_adapter import dense_encoder, sparse_encoder, truncated_encoder

    backbone = TextBackbone()                                  # all-MiniLM-L6-v2, 384-d
    embed = lambda texts: backbone.embed(texts, progress=False)
    head = csrv2.load("runs/my-head")
    tasks = mteb.get_tasks(tasks=["STSBenchmark.v2", "Banking77Classification.v2"])
    for model in (dense_encoder(embed, name="me/minilm"), truncated_encoder(embed, 64, name="me/minilm"),
                  sparse_encoder(embed, head, k=8, name="me/minilm-csrv2")):
        results = mteb.evaluate(model, tasks, encode_kwargs={"batch_size": 256})
        for result in results.task_results:
            print(model.mteb_model_meta.model_name_with_experiment, result.task_name, result.get_score())

`mteb.evaluate` caches results under ~/.cache/mteb by model name, revision and experiment (k or
dims) and by default skips what it finds there: give each backbone/head a distinct `name`, or pass
`cache=None` (a sparse encoder's revision is a digest of the head's weights, so a retrained head is
scored again). Prompts and instructions are ignored: the backbone sees the raw texts.
MTEB's STS cosines are float32 (1 - distance): two codes that share no latent score 0 or about 1e-7,
so MTEB ranks such ties by rounding noise where `csrv2.eval.metrics.spearman` gives them average ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..head import SparseHead, encode
from .baselines import truncate

try:
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
except ImportError as e:
    raise ImportError('csrv2.eval.mteb_adapter needs mteb: pip install "mteb>=2.26"') from e

Embed = Callable[[list[str]], np.ndarray]
Transform = Callable[[np.ndarray], np.ndarray]


class CSRv2Encoder(AbsEncoder):
    """An MTEB encoder: `transform(embed(texts))` for each batch of texts MTEB passes in.

    embed: list of n texts -> (n, d) dense embeddings (the backbone).
    transform: (n, d) -> (n, m) what is scored; None scores the embeddings themselves.
    name: "organization/model" as MTEB requires; with revision and experiment_kwargs it keys
        MTEB's result cache. embed_dim: m when known, for the metadata only.
    """

    def __init__(
        self,
        embed: Embed,
        transform: Transform | None = None,
        name: str = "csrv2/unnamed",
        *,
        revision: str = "unversioned",
        embed_dim: int | None = None,
        model_type: str = "dense",
        experiment_kwargs: dict[str, Any] | None = None,
    ):
        self.embed, self.transform = embed, transform
        self.mteb_model_meta = ModelMeta(
            loader=None, name=name, revision=revision, release_date=None, languages=None,
            n_parameters=None, memory_usage_mb=None, max_tokens=None, embed_dim=embed_dim, license=None,
            open_weights=None, public_training_code=None, public_training_data=None, framework=["PyTorch", "NumPy"],
            similarity_fn_name="cosine", use_instructions=False, training_datasets=None, model_type=[model_type],
            experiment_kwargs=experiment_kwargs,
        )

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs) -> np.ndarray:
        """inputs: DataLoader of {"text": [str, ...], ...} batches -> (n, m) float32, rows in input order.

        The task, split, subset and prompt type are ignored: every text is represented the same way.
        """
        out = []
        for batch in inputs:
            x = np.asarray(self.embed(list(batch["text"])), dtype=np.float32)  # (batch, d)
            out.append(x if self.transform is None else np.asarray(self.transform(x), dtype=np.float32))  # (batch, m)
        return np.concatenate(out)


def dense_encoder(embed: Embed, name: str = "csrv2/unnamed", **fields) -> CSRv2Encoder:
    """The backbone's own embeddings, scored as they are."""
    return CSRv2Encoder(embed, None, name, experiment_kwargs={"representation": "dense"}, **fields)


def truncated_encoder(embed: Embed, dims: int, name: str = "csrv2/unnamed", **fields) -> CSRv2Encoder:
    """The first `dims` coordinates of each embedding (MRL truncation), L2-normalised (zero rows stay zero)."""

    def transform(x: np.ndarray) -> np.ndarray:
        t = truncate(x, dims)  # (n, dims)
        norm = np.linalg.norm(t, axis=1, keepdims=True)
        return np.divide(t, norm, out=np.zeros_like(t), where=norm > 0)

    return CSRv2Encoder(embed, transform, name, embed_dim=dims,
                        experiment_kwargs={"representation": "truncated", "dims": dims}, **fields)


def sparse_encoder(embed: Embed, head: SparseHead, k: int, name: str = "csrv2/unnamed", **fields) -> CSRv2Encoder:
    """The head's k-sparse codes of each embedding, zero-filled to (n, hidden_dim) float32.

    The revision is a digest of the head's weights unless given.
    """
    fields.setdefault("revision", head.digest()[:12])
    return CSRv2Encoder(embed, lambda x: encode(head, x, k, progress=False).to_dense(), name,
                        embed_dim=head.config.hidden_dim, model_type="sparse",
                        experiment_kwargs={"representation": "csrv2", "k": k}, **fields)


__all__ = ["CSRv2Encoder", "dense_encoder", "sparse_encoder", "truncated_encoder"]
