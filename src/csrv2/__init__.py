"""csrv2: ultra-sparse embeddings. Train CSRv2 TopK sparse heads and encode dense embeddings into k-sparse codes.

    import csrv2
    head = csrv2.train(embeddings, labels, k=2, out="runs/my-head")   # (n, d) float array, (n,) labels
    codes = csrv2.encode(head, new_embeddings)                       # SparseCodes: indices, values (n, 2)
    head = csrv2.load("runs/my-head")
"""

__version__ = "0.1.0"

from .codes import SparseCodes, encode  # noqa: E402
from .config import HeadConfig, TrainConfig, preset  # noqa: E402
from .data import TrainingData, load_training_data  # noqa: E402
from .errors import InputError  # noqa: E402
from .head import SparseHead  # noqa: E402
from .index import InvertedIndex  # noqa: E402
from .model import load_head as load, save_head as save  # noqa: E402
from .trainer import Trainer, train  # noqa: E402

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
    "save",
    "train",
]
