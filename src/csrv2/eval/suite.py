"""`csrv2 reproduce`: the paper's comparison in one command, on real models and data that ship offline.

Embed every task's data (cached), train every method at every size on each task's training set,
score every task, then write results.json, results.md and two plots, and print the table. Methods:
  dense         the backbone embedding itself (one row);
  mrl-truncate  its first m dims;
  mrl-linear    a Matryoshka-trained linear head on the frozen embeddings, prefix m (baselines.py);
  csr           CSR v1: a sparse head at fixed k, no labels: contrastive on the pairs for retrieval, else self-supervised;
  csrv2-linear  CSRv2 head only: k annealed from 64, supervised contrastive (pairs for retrieval).
Opt-in, since they train the backbone (csrv2-full takes about an hour on 2 CPU cores for the default suite at k = 2):
  csrv2-full    CSRv2: backbone + head trained end to end with the csrv2-linear objective (finetune.py);
  mrl-finetuned the backbone finetuned alone with the Matryoshka objective on the same budget, prefix m.
Every head-only method uses the same data, epochs, batch size, optimizer and seed; the two end-to-end
methods share theirs (finetune_epochs, finetune_batch_size, backbone_lr). On image sets every trained
method takes the paper's vision recipe (lr 4e-4, AuxK weight 1/32). A finetuned backbone
re-embeds the data of the tasks it serves (through the cache, keyed by its weights).

Two protocols for the sparse heads: "same-k", the paper's (queries coded at the documents' k), and
"asymmetric" (documents and stored train codes at k, queries coded at query_k or dense, `head.project`),
which changes retrieval and 1-NN; the paper's targets are checked on the first.

The user's files (`data`) become tasks of their own beside or instead of the packaged ones (user_data.py): their
texts are embedded like the packaged sets', their embeddings used as they are.

An interrupted run resumes: each head is saved under out/heads and each scored row under out/rows,
keyed by a hash of everything that determines it, and a rerun reuses whatever matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from ..atomic import write_json, write_text
from ..codes import SparseCodes
from ..config import (
    DEFAULT_EPOCHS,
    DEFAULT_QUERY_K,
    TEMPERATURE,
    VISION_RECIPE,
    HeadConfig,
    TrainConfig,
    preset,
    resolve_device,
    resolve_temperature,
)
from ..data.backbones import ImageBackbone, TextBackbone
from ..data.cache import EmbeddingCache
from ..data.datasets import load_dataset
from ..data.training import TrainingData
from ..errors import InputError
from ..export import read_sparse_encoder
from ..finetune import FINETUNE_EPOCHS, FinetuneConfig, Finetuner, read_image_model
from ..head import SparseHead, encode, project
from ..model import load_head, read_settings, save_head
from ..trainer import Trainer, contrastive_mode, latest_checkpoint
from .baselines import load_matryoshka, save_matryoshka, train_matryoshka, truncate
from .metrics import code_stats, dense_bytes_per_vector
from .report import markdown_table, plot_results, summarise, target_lines
from .tasks import DEFAULT_TASKS, TASKS, EmbeddedSet, Task, embed_dataset, hold_out, score, training_data, training_items
from .user_data import load_user_data, user_tasks

DEFAULT_METHODS = ("dense", "mrl-truncate", "mrl-linear", "csr", "csrv2-linear")
FINETUNED = ("csrv2-full", "mrl-finetuned")
METHODS = DEFAULT_METHODS + FINETUNED
SIZES = (2, 4, 8, 16, 32, 64)
QUICK = {"max_train": 400, "max_test": 200, "k": (2, 8, 32)}


@dataclass(frozen=True)
class SuiteConfig:
    """What `csrv2 reproduce` runs. Sizes are caps: a data set smaller than a cap is used whole."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    """Tasks to score (default: the six text tasks; fashion-mnist and digits are image tasks); () with data: only the user's."""
    data: tuple[str, ...] = ()
    """The user's files, scored as tasks named after their stems: a labelled .csv/.jsonl/.parquet table (classification and
    clustering), a pairs table (with pairs: retrieval), or embeddings (.npz of embeddings + labels, or queries + documents)."""
    text_column: str = "text"
    """Text column of a labelled table in data."""
    label_column: str = "label"
    """Label column of a labelled table in data."""
    pairs: bool = False
    """The tables in data hold query/document pairs (retrieval)."""
    query_column: str = "query"
    """Query column of a pairs table in data."""
    document_column: str = "document"
    """Document column of a pairs table in data."""
    labels: str = ""
    """Labels (.npy or .npz, one per row) of .npy embeddings in data."""
    methods: tuple[str, ...] = DEFAULT_METHODS
    """Methods to compare; csrv2-full and mrl-finetuned (end to end) are opt-in."""
    k: tuple[int, ...] = SIZES
    """Non-zeros per code for csr / csrv2-linear, and dims for the MRL methods."""
    out: str = "runs/reproduce"
    """Folder for results.json, results.md, the plots, heads and scored rows."""
    quick: bool = False
    """A ~3-minute version: 400 train / 200 test rows per data set, k = 2, 8, 32."""
    max_train: int = 2000
    """Train rows (or pairs) kept per data set, a seeded subset."""
    max_test: int = 1000
    """Test rows (or pairs) kept per data set, a seeded subset."""
    epochs: int = DEFAULT_EPOCHS
    """Training epochs of every head-only method: TrainConfig's default, chosen on the validation splits (`--validation`;
    the test splits were not looked at)."""
    hidden_dim: int = 0
    """Latents of the sparse heads (0: 4 x the backbone dimension)."""
    finetune_k: tuple[int, ...] = (2,)
    """Non-zeros per code of csrv2-full: each k finetunes a backbone of its own (mrl-finetuned trains one for all of --k)."""
    finetune_init: Literal["random", "linear"] = "linear"
    """Starting head of csrv2-full: the csrv2-linear head of the same data and k (then k stays), or random (k annealed from 64);
    linear won on the validation splits."""
    finetune_epochs: int = FINETUNE_EPOCHS
    """Training epochs of the end-to-end methods (csrv2-full, mrl-finetuned)."""
    finetune_batch_size: int = 32
    """Items (or pairs) per optimizer step of the end-to-end methods."""
    backbone_lr: float = 2e-5
    """Adam learning rate of the backbone in the end-to-end methods (their heads keep the head-only lr)."""
    model: str = ""
    """Text backbone: a sentence-transformers folder or hub name (default: the packaged all-MiniLM-L6-v2)."""
    max_seq_length: int = 128
    """Tokens kept per text: what makes news articles affordable on a CPU."""
    image_size: int = 64
    """Side in pixels images are resized to for EfficientNet-Lite0."""
    query_k: int = DEFAULT_QUERY_K
    """Latents of a query code in the asymmetric protocol, or the row's k if larger (documents and stored train codes keep theirs)."""
    asymmetric: Literal["query-k", "dense"] = "query-k"
    """Which query side the table's asymmetric rows show: codes at query_k, or dense (`head.project`); results.json keeps both."""
    validation: bool = False
    """Score a held-out 20% of each train split instead of the test splits, to choose settings honestly
    (tasks without a train split are skipped)."""
    seed: int = 0
    """Seed of the data subsets and splits, weights and data order."""
    device: str = "auto"
    """Device for the backbones and the training: auto, cpu, cuda, mps."""
    cache_dir: str = ""
    """Embedding cache (default: $CSRV2_CACHE or ~/.cache/csrv2)."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not (self.tasks or self.data):
            raise ValueError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        for name in ("k", "finetune_k"):
            if not getattr(self, name) or any(k < 1 for k in getattr(self, name)):
                raise ValueError(f"{name} must be positive sizes, got {getattr(self, name)}")
        for name in ("max_train", "max_test", "epochs", "max_seq_length", "finetune_epochs", "finetune_batch_size", "query_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def resolved(self) -> SuiteConfig:
        """The config as run: with quick, QUICK's values replace the fields left at their defaults."""
        if not self.quick:
            return self
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{name: v for name, v in QUICK.items() if getattr(self, name) == defaults[name]})


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_hash(data: EmbeddedSet) -> str:
    digest = hashlib.sha256(data.name.encode())
    for f in dataclasses.fields(EmbeddedSet):
        value = getattr(data, f.name)
        if isinstance(value, np.ndarray):
            digest.update(f.name.encode() + np.ascontiguousarray(value).astype(str if value.dtype.kind in "OU" else value.dtype).tobytes())
    return digest.hexdigest()[:16]


class Suite:
    """Runs a `SuiteConfig`: owns the backbones, the embedded data sets and the trained heads."""

    def __init__(self, config: SuiteConfig, progress: bool = True):
        self.cfg, self.progress = config.resolved(), progress
        self.out = Path(self.cfg.out)
        self.cache = EmbeddingCache(Path(self.cfg.cache_dir) / "embeddings" if self.cfg.cache_dir else None)
        device = str(resolve_device(self.cfg.device))  # resolved once; the trainers resolve the same name
        self.text = TextBackbone(self.cfg.model or None, device=device, max_seq_length=self.cfg.max_seq_length)
        self.image = ImageBackbone(self.cfg.image_size, device=device)
        self.device = device
        self.datasets: dict[str, object] = {}  # name -> the loaded data set
        self.tasks = {name: TASKS[name] for name in self.cfg.tasks}  # the packaged tasks run, then the user's (`load_user_files`)
        self.data: dict[str, EmbeddedSet] = {}  # name -> its embeddings by the frozen backbone
        self.hashes: dict[str, str] = {}  # data set name -> digest of its embeddings and labels, taken once
        self.budget = {"epochs": self.cfg.epochs, "seed": self.cfg.seed, "device": self.cfg.device}  # every head-only method's
        self.finetune_budget = {"epochs": self.cfg.finetune_epochs, "batch_size": self.cfg.finetune_batch_size,
                                "backbone_lr": self.cfg.backbone_lr, "seed": self.cfg.seed, "device": self.cfg.device}
        # (model folder, data set) -> its embeddings, head
        self.finetuned: dict[tuple[Path, str], tuple[EmbeddedSet, SparseHead | None]] = {}

    # --- the run, top to bottom -------------------------------------------------------------
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.load_user_files()
        tasks = list(self.tasks.values())
        if self.cfg.validation:  # a task whose data has no train split (STS) has nothing to hold out
            tasks = [t for t in tasks if t.dataset == t.training_set]
        for name in dict.fromkeys(n for t in tasks for n in (t.dataset, t.training_set)):
            self.data[name] = self.embed(name)
            self.hashes[name] = _data_hash(self.data[name])
        plan = [(task, method, size) for task in tasks for method in self.cfg.methods for size in self.sizes(method, task)]
        rows = []
        bar = tqdm(plan, desc="reproduce", unit="row", disable=not self.progress)
        for task, method, size in bar:
            bar.set_postfix_str(f"{task.name} {method} {size}")
            rows += self.rows(task, method, size)
        results = {"settings": {**dataclasses.asdict(self.cfg), "backbone": self.text.name, "csrv2_version": version("csrv2"),
                                "data_sizes": {n: d.sizes for n, d in self.data.items()}},
                   "rows": rows, "summary": summarise(rows)}
        self.write(results)
        return results

    def load_user_files(self) -> None:
        """Read and split the user's files (before any work, so that a bad one stops the run at once) and add their tasks."""
        for path in self.cfg.data:
            loaded = load_user_data(path, pairs=self.cfg.pairs, text_column=self.cfg.text_column, label_column=self.cfg.label_column,
                                    query_column=self.cfg.query_column, document_column=self.cfg.document_column, labels=self.cfg.labels,
                                    seed=self.cfg.seed, max_train=self.cfg.max_train, max_test=self.cfg.max_test)
            if loaded.name in self.datasets:
                raise InputError(f"{path}: another file in --data has the name {loaded.name!r}; rename one of them")
            if isinstance(loaded, EmbeddedSet) and any(m in FINETUNED for m in self.cfg.methods):
                raise InputError(f"{path}: holds embeddings, and {', '.join(FINETUNED)} train backbones on texts; drop them from --methods")
            self.datasets[loaded.name] = loaded
            self.tasks.update({task.name: task for task in user_tasks(loaded.name, loaded)})

    def sizes(self, method: str, task: Task) -> tuple[int, ...]:
        if method == "dense":
            return (self.dim(task),)
        if method.startswith("mrl-"):
            return self.mrl_dims(task.dataset)
        return tuple(sorted(self.cfg.finetune_k if method == "csrv2-full" else self.cfg.k))

    def mrl_dims(self, name: str) -> tuple[int, ...]:
        """The sizes of k an MRL prefix of `name`'s embeddings can take: none wider than they are (user embeddings may be narrow)."""
        return tuple(m for m in sorted(self.cfg.k) if m <= self.data[name].test.shape[1])

    def dim(self, task: Task) -> int:
        return self.data[task.dataset].test.shape[1]

    def dataset(self, name: str):
        """The data set `name`, loaded once with the suite's sizes and seed."""
        if name not in self.datasets:  # the user's files are read by `load_user_files`
            sizes = {} if _kind(name) == "sts" else {"max_train": self.cfg.max_train, "max_test": self.cfg.max_test, "seed": self.cfg.seed}
            self.datasets[name] = load_dataset(name, **sizes)
        return self.datasets[name]

    def embed(self, name: str, backbone: TextBackbone | ImageBackbone | None = None) -> EmbeddedSet:
        """The data set's embeddings by `backbone` (default: the frozen one of its kind), through the cache."""
        backbone = backbone or (self.image if _kind(name, self.tasks) == "image" else self.text)
        dataset = self.dataset(name)
        # embeddings the user gave are used as they are: no backbone runs
        data = dataset if isinstance(dataset, EmbeddedSet) else embed_dataset(dataset, backbone, self.cache, progress=self.progress)
        return hold_out(data, seed=self.cfg.seed) if self.cfg.validation else data

    def rows(self, task: Task, method: str, size: int) -> list[dict]:
        """Score one (task, method, size), reusing the stored rows when everything that makes them matches: one row, and
        for a sparse head a second, protocol "asymmetric": the same codes stored, queries coded at query_k or dense
        (both scored into its metrics, the table's `asymmetric` choice as its score)."""
        train_key = self.head_key(task.training_set, method, size)
        query_k = max(self.cfg.query_k, size)  # never narrower than the documents' codes, as `csrv2 search` codes them
        key = _hash([task, self.hashes[task.dataset], train_key, method, size, version("csrv2"), [query_k, self.cfg.asymmetric]])
        path = self.out / "rows" / task.name / f"{method}-{size}-{key}.json"
        if path.exists():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                pass  # a damaged row is scored again
        data, represent, head, train_info = self.representation(task, method, size)
        queries = {} if head is None else {f"query k={self.cfg.query_k}": lambda x: encode(head, x, query_k, progress=False),
                                           "dense query": lambda x: project(head, x, progress=False)}
        start = time.perf_counter()
        metrics, evaluated = score(task, data, represent, queries)
        row = {"task": task.name, "kind": task.kind, "metric": task.metric, "method": method, "size": size, "protocol": "same-k",
               "score": metrics[task.metric], "metrics": metrics, **self.stats(evaluated),
               **train_info, "eval_seconds": round(time.perf_counter() - start, 3)}
        rows = [row]
        if head is not None:
            shown = f"query k={self.cfg.query_k}" if self.cfg.asymmetric == "query-k" else "dense query"
            rows.append({**row, "protocol": "asymmetric", "queries": shown, "score": metrics.get(f"{task.metric} {shown}", row["score"])})
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, rows)
        return rows

    def head_key(self, training_set: str, method: str, size: int) -> str | None:
        if method in ("dense", "mrl-truncate"):
            return None
        # One Matryoshka head (or backbone) serves every prefix, so it depends on the whole list of sizes; a sparse head on its k alone.
        size = list(self.mrl_dims(training_set)) if method.startswith("mrl-") else size
        warm = [self.cfg.finetune_init] if method == "csrv2-full" and self.cfg.finetune_init != "random" else []
        budget = self.budget_for(training_set, method)
        named = []  # what else decides the head, named only where it departs from the first recipe, so that other heads keep their keys
        if method in ("csr", "csrv2-linear", "csrv2-full"):
            form = self.contrastive_form(training_set, "csrv2-linear" if method == "csrv2-full" else method)
            if method == "csr" and form != "self":  # csr's form follows its data: pairs, else self
                named.append(form)
            if (temperature := resolve_temperature(None, form, size)) != TEMPERATURE:
                named.append(f"temperature={temperature}")
        if method in FINETUNED and _kind(training_set, self.tasks) == "image":
            named.append("frozen batchnorm, detached target")  # FinetuneConfig's image defaults
        return _hash([self.hashes[training_set], method, size, budget, self.cfg.hidden_dim, version("csrv2"), *warm, *named])

    def contrastive_form(self, training_set: str, method: str) -> str:
        """The contrastive form the head-only sparse `method` trains with on `training_set`: supervised, pairs or self."""
        data, config = sparse_recipe(self.data[training_set], method, self.budget_for(training_set, method))
        return contrastive_mode(config, data)

    def budget_for(self, training_set: str, method: str) -> dict:
        """The TrainConfig fields `method` trains with on `training_set` (plus backbone_lr for the end-to-end methods):
        image sets take the paper's vision recipe (lr 4e-4, beta = 1/32; its batch of 4096 exceeds these train splits)."""
        budget = self.finetune_budget if method in FINETUNED else self.budget
        return {**budget, **(VISION_RECIPE if _kind(training_set, self.tasks) == "image" else {})}

    def representation(self, task: Task, method: str, size: int):
        """(the embedded data scored, a function from its dense embeddings to what is scored, the sparse head or None,
        training facts for the row)."""
        data = self.data[task.dataset]
        if method == "dense":
            return data, (lambda x: x), None, {}
        if method == "mrl-truncate":
            return data, (lambda x: truncate(x, size)), None, {}
        if method in FINETUNED:
            folder, info = self.finetuned_model(task.training_set, method, size)
            data, head = self.finetuned_embeddings(folder, task.dataset)
            if head is None:
                return data, (lambda x: truncate(x, size)), None, info
            return data, (lambda x: encode(head, x, size, progress=False)), head, info
        folder, info = self.trained_head(task.training_set, method, size)
        if method == "mrl-linear":
            head = load_matryoshka(folder)
            return data, (lambda x: head.encode(x, size)), None, info
        head = load_head(folder)
        return data, (lambda x: encode(head, x, size, progress=False)), head, info

    def trained_head(self, training_set: str, method: str, size: int) -> tuple[Path, dict]:
        """The folder of the head `method` trains on `training_set` (trained now unless already saved)."""
        key = self.head_key(training_set, method, size)
        label = "mrl-linear" if method == "mrl-linear" else f"{method}-k{size}"
        folder = self.out / "heads" / training_set / f"{label}-{key}"
        info_file = folder / "train_info.json"
        if info_file.exists():
            return folder, json.loads(info_file.read_text())
        data = self.data[training_set]
        start = time.perf_counter()
        if method == "mrl-linear":
            dims = self.mrl_dims(training_set)
            budget = TrainConfig(**self.budget_for(training_set, method))
            head = train_matryoshka(training_data(data, with_labels=True), budget, dims, progress=False)
            save_matryoshka(head, folder)
            info = {}
        else:
            head, info = self.train_sparse(data, method, size, self.budget_for(training_set, method))
            save_head(head, folder)
        info = {**info, "train_seconds": round(time.perf_counter() - start, 3)}
        write_json(info_file, info)  # last: a folder without it is trained again
        return folder, info

    def train_sparse(self, data: EmbeddedSet, method: str, k: int, budget: dict):
        train_data, train_config = sparse_recipe(data, method, budget)
        trainer = Trainer(HeadConfig(train_data.dim, self.cfg.hidden_dim, k), train_config, train_data, progress=False)
        head = trainer.fit()
        return head, {"train_dead_pct": 100.0 * trainer.dead_fraction(), "train_steps": trainer.total_steps}

    def finetuned_model(self, training_set: str, method: str, size: int) -> tuple[Path, dict]:
        """The folder of the model `method` finetunes on `training_set` (trained now, or resumed, unless finished)."""
        key = self.head_key(training_set, method, size)
        label = method if method == "mrl-finetuned" else f"{method}-k{size}"
        folder = self.out / "models" / training_set / f"{label}-{key}"
        info_file = folder / "train_info.json"
        if info_file.exists():
            return folder, json.loads(info_file.read_text())
        items, labels, documents = training_items(self.dataset(training_set), self.cfg.validation, self.cfg.seed)
        image = _kind(training_set, self.tasks) == "image"
        backbone = ImageBackbone(self.cfg.image_size, device=self.device) if image else \
            TextBackbone(self.cfg.model or None, device=self.device, max_seq_length=self.cfg.max_seq_length)
        objective = "matryoshka" if method == "mrl-finetuned" else "csrv2"
        budget = {name: v for name, v in self.budget_for(training_set, method).items() if name != "backbone_lr"}
        start_head = None
        if method == "csrv2-full" and self.cfg.finetune_init == "linear":
            start_head = load_head(self.trained_head(training_set, "csrv2-linear", size)[0])
        resume = folder.is_dir() and latest_checkpoint(folder) is not None  # an interrupted run goes on
        start = time.perf_counter()
        finetuner = Finetuner(backbone, items, labels, documents, k=size, hidden_dim=self.cfg.hidden_dim, train=TrainConfig(**budget),
                              finetune=FinetuneConfig(objective, self.cfg.backbone_lr, mrl_dims=tuple(sorted(self.cfg.k))),
                              out=folder, resume=resume, overwrite=not resume, progress=self.progress, head=start_head)
        finetuner.fit()
        info = {"train_seconds": round(time.perf_counter() - start, 3), "train_steps": finetuner.total_steps}
        if finetuner.head is not None:
            info["train_dead_pct"] = 100.0 * finetuner.dead_fraction()
        write_json(info_file, info)  # last: a folder without it is trained again
        return folder, info

    def finetuned_embeddings(self, folder: Path, name: str) -> tuple[EmbeddedSet, SparseHead | None]:
        """Data set `name` embedded by the finetuned backbone in `folder`, and its head (None for MRL); loaded once."""
        if (folder, name) not in self.finetuned:
            if _kind(name, self.tasks) == "image":
                backbone, head = read_image_model(folder, self.device)
            elif read_settings(folder)["finetune"]["objective"] == "csrv2":
                backbone, head = read_sparse_encoder(folder)
            else:
                backbone, head = TextBackbone(folder, device=self.device), None
            self.finetuned[folder, name] = (self.embed(name, backbone), head)
        return self.finetuned[folder, name]

    def stats(self, evaluated: list) -> dict:
        if isinstance(evaluated[0], SparseCodes):
            indices, values = (np.concatenate([getattr(c, name) for c in evaluated]) for name in ("indices", "values"))
            codes = SparseCodes(indices, values, evaluated[0].dim)
            return code_stats(codes)
        dim = evaluated[0].shape[1]
        return {"active_dims": float(dim), "dead_latents_pct": None, "bytes_per_vector": dense_bytes_per_vector(dim)}

    def write(self, results: dict) -> None:
        write_json(self.out / "results.json", results)
        table = markdown_table(results)
        write_text(self.out / "results.md", table + "\n\n" + "\n".join(target_lines(results)) + "\n")
        plot_results(results, self.out)


def sparse_recipe(data: EmbeddedSet, method: str, budget: dict) -> tuple[TrainingData, TrainConfig]:
    """What a head-only sparse method trains on, and how: csrv2-linear the csrv2 preset on the train split's labels
    or pairs; csr the csr preset on the same split without labels (its pairs where it has them, else self-supervised)."""
    with_labels = method == "csrv2-linear"
    return training_data(data, with_labels), preset("csrv2" if with_labels else "csr", **budget)


def _kind(name: str, tasks: dict[str, Task] | None = None) -> str:
    """The task kind of a data set's first task, among the packaged tasks and `tasks` (the user's): decides its sizes and its backbone."""
    return next(t.kind for t in {**TASKS, **(tasks or {})}.values() if t.dataset == name)


def reproduce(config: SuiteConfig | None = None, progress: bool = True) -> dict:
    """Run the suite and return results (also written under config.out)."""
    return Suite(config or SuiteConfig(), progress).run()


__all__ = ["DEFAULT_METHODS", "FINETUNED", "METHODS", "SIZES", "Suite", "SuiteConfig", "reproduce"]
