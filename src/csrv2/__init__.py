"""csrv2: ultra-sparse embeddings. Train CSRv2 TopK sparse heads and encode dense embeddings into k-sparse codes.

    import csrv2
    head = csrv2.train(embeddings, labels, k=2, out="runs/my-head")   # (n, d) float array, (n,) labels
    codes = csrv2.encode(head, new_embeddings)                       # SparseCodes: indices, values (n, 2)
    index = csrv2.InvertedIndex.build(codes, "cosine")
    ids, scores = index.search(csrv2.project(head, queries), 10)      # dense queries against the stored codes
    head = csrv2.load("runs/my-head")
"""

from importlib.metadata import version

__version__ = version("csrv2")

from .codes import SparseCodes
from .config import HeadConfig, TrainConfig, preset
from .data.training import TrainingData, load_training_data
from .errors import InputError
from .head import SparseHead, encode, project
from .model import load_head as load
from .model import save_head as save
from .search.index import InvertedIndex
from .trainer import Trainer, train

__all__ = [
    "HeadConfig",
    "InputError",
    "InvertedIndex",
    "SparseCodes",
    "SparseHead",
    "TrainConfig",
    "Trainer",
    "TrainingData",
    "encode",
    "load",
    "load_training_data",
    "preset",
    "project",
    "save",
    "train",
]
