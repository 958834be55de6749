"""`csrv2` (and `python -m csrv2`): a thin shell over the Python API. Each command parses options,
makes one API call, and turns bad input into one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path

import numpy as np

from .config import PRESETS, HeadConfig, TrainConfig, field_docs
from .data.datasets import DATASETS as DATASET_NAMES
from .eval.suite import METHODS, SuiteConfig
from .eval.tasks import TASKS
from .finetune import FinetuneConfig

HEAD_OPTIONS = ("k", "hidden_dim", "k_aux", "normalize", "dead_threshold")
# The TrainConfig fields end-to-end training reads (its contrastive form follows the data; it writes no checkpoints yet).
FINETUNE_TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "adam_eps", "anneal", "k_init", "decay_ratio", "multi_k_coef",
                          "aux_coef", "cl_coef", "temperature", "seed", "device", "tf32")
FINETUNE_K = 2  # end to end aims at the smallest codes; the head-only default stays HeadConfig's


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, names=None, choices: dict | None = None, defaults: dict | None = None) -> None:
    """One --option per dataclass field, its help the field's docstring; unset options stay None.
    `defaults` names the value a command uses instead of the field's own, for the help."""
    choices, defaults = choices or {}, defaults or {}
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        help_text = (docs.get(f.name, "") + ("" if default is None else f" (default: {default})")).replace("%", "%%")  # argparse formats help
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif str(f.type).startswith("Literal["):  # one of named values
            values = ast.literal_eval(str(f.type)[len("Literal"):].replace("[", "(", 1).rstrip("]") + ")")
            parser.add_argument(flag, choices=values, default=None, help=help_text)
        elif str(f.type).startswith("tuple["):  # several values: --k 2 8 32
            kind = int if str(f.type) == "tuple[int, ...]" else str
            parser.add_argument(flag, type=kind, nargs="+", default=None, choices=choices.get(f.name), metavar=f.name.upper(), help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csrv2",
        description="Ultra-sparse embeddings: train CSRv2 sparse heads on dense embeddings and encode k-sparse codes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train a sparse head on embeddings",
        description=(
            "Train a CSRv2 sparse head on dense embeddings and write a model folder. "
            "Inputs are NumPy files: .npy (memory-mapped) or .npz whose arrays are named "
            "'embeddings' (+ optional 'labels'), or 'queries' and 'documents' for query/document pairs. "
            "Every option overrides the preset."
        ),
    )
    io = train.add_argument_group("data and output")
    io.add_argument("--embeddings", required=True, metavar="E.npy", help="(n, d) float embeddings, .npy or .npz (see above)")
    io.add_argument("--labels", metavar="Y.npy", help="(n,) labels (ints or strings), .npy or .npz array 'labels': enables the supervised contrastive loss")
    io.add_argument("--documents", metavar="D.npy", help="(n, d) documents paired row by row with --embeddings as queries: enables the pairs loss")
    io.add_argument("--out", required=True, metavar="MODEL_DIR", help="run folder: the model, train_log.jsonl and checkpoints are written here")
    io.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    io.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    io.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--preset", choices=PRESETS, default="csrv2", help="csrv2: k-annealing + supervised (labels) or pairs (documents) contrastive; csr: CSR v1, fixed k, self-supervised contrastive (default: csrv2)")
    head = train.add_argument_group("sparse head")
    _add_dataclass_options(head, HeadConfig, HEAD_OPTIONS)
    opt = train.add_argument_group("training (defaults: the csrv2 preset)")
    _add_dataclass_options(opt, TrainConfig)

    enc = sub.add_parser(
        "encode",
        help="encode embeddings into k-sparse codes",
        description="Encode dense embeddings with a trained head. Writes an .npz with 'indices' and 'values', each (n, k), and 'dim'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_encoding_options(enc, "--embeddings", "E.npy")
    enc.add_argument("--out", required=True, metavar="CODES.npz", help="output file")

    index = sub.add_parser("index", help="build an inverted index of codes").add_subparsers(dest="index_command", required=True)
    build = index.add_parser(
        "build",
        help="encode embeddings and index their codes",
        description="Encode dense embeddings with a trained head and write an inverted index file (exact top-n search).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_encoding_options(build, "--embeddings", "E.npy", required=False)
    build.add_argument("--data", metavar="NAME|FILE", help="texts instead of --embeddings: a packaged data set (its --split) or a "
                       ".csv/.jsonl/.parquet file (its --text-column); they are embedded with --backbone and kept beside the index")
    build.add_argument("--split", choices=("train", "test"), default="test", help="split of a packaged data set")
    build.add_argument("--text-column", default="text", help="text column of a file")
    _add_backbone_options(build, "the packaged all-MiniLM-L6-v2")
    build.add_argument("--metric", choices=("ip", "cosine"), default="cosine", help="score: inner product, or cosine of the codes")
    build.add_argument("--out", required=True, metavar="INDEX", help="index file, written atomically")

    search = sub.add_parser(
        "search",
        help="search an index with query embeddings",
        description=(
            "Encode queries with the head that built the index and print (or save) their top hits: query texts "
            "(embedded by the index's backbone, hits printed with their texts) or a --queries embeddings file."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    search.add_argument("--index", required=True, metavar="INDEX", help="file written by `csrv2 index build`")
    search.add_argument("texts", nargs="*", metavar="QUERY", help="query texts")
    _add_encoding_options(search, "--queries", "Q.npy", required=False)
    _add_backbone_options(search, "the index's")
    search.add_argument("--top-n", type=int, default=10, help="hits per query")
    search.add_argument("--out", metavar="HITS.npz", help="also write 'ids' and 'scores', each (q, top_n); -1 / -inf pad rows with fewer hits")

    embed = sub.add_parser(
        "embed",
        help="embed texts or images with a backbone (cached)",
        description=(
            "Embed a packaged data set's split, or a file: .csv/.jsonl/.parquet with a text and a label column "
            "(or query/document columns with --pairs), or an .npz of 'images' and 'labels'. Writes an .npz that "
            "`csrv2 train --embeddings` reads: 'embeddings' (+ 'labels'), or 'queries' and 'documents'. "
            "Embeddings are cached by model and data content, so a second run does not embed again."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    embed.add_argument("--data", required=True, metavar="NAME|FILE", help=f"a packaged data set ({', '.join(DATASET_NAMES)}) or a file")
    embed.add_argument("--out", required=True, metavar="E.npz|DIR", help="a .npz file, or a folder of .npy shards (one per rank under torchrun); written atomically")
    embed.add_argument("--overwrite", action="store_true", help="replace the shards a folder --out already holds")
    embed.add_argument("--split", choices=("train", "test"), default="train", help="split of a packaged data set")
    _add_source_options(embed)
    embed.add_argument("--model", default=None, help="sentence-transformers folder or hub name (default: the packaged all-MiniLM-L6-v2)")
    embed.add_argument("--max-seq-length", type=int, default=None, help="tokens kept per text (default: the model's)")
    embed.add_argument("--image-size", type=int, default=64, help="side images are resized to for EfficientNet-Lite0")
    embed.add_argument("--batch-size", type=int, default=32, help="texts embedded at once")
    embed.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    embed.add_argument("--seed", type=int, default=0, help="seed of packaged splits and subsets")
    embed.add_argument("--cache-dir", default=None, help="embedding cache (default: $CSRV2_CACHE or ~/.cache/csrv2)")
    embed.add_argument("--no-progress", action="store_true", help="hide progress bars")

    export = sub.add_parser(
        "export",
        help="write backbone + head as a sentence-transformers SparseEncoder folder",
        description="Write a folder that sentence_transformers.SparseEncoder(path) loads: the backbone's modules, then the "
                    "head as its SparseAutoEncoder module; csrv2's training settings go to csrv2.json. Written whole or not at all.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    export.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder written by `csrv2 train`")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_backbone_options(export, "the packaged all-MiniLM-L6-v2")

    finetune = sub.add_parser(
        "finetune",
        help="train a backbone and a sparse head together (end-to-end CSRv2), or a backbone alone as a Matryoshka peer",
        description="Train a backbone end to end on texts with labels (supervised loss) or query/document pairs (pairs loss), "
                    "or on images with labels: with a CSRv2 head (--objective csrv2; texts give a sentence-transformers "
                    "SparseEncoder folder) or alone with nested-prefix losses (--objective matryoshka). Checkpoints every "
                    "epoch into --out; --resume continues an interrupted run.",
    )
    data = finetune.add_argument_group("data and output")
    data.add_argument("--data", required=True, metavar="NAME|FILE", help="a packaged data set's train split, a .csv/.jsonl/.parquet table or an image .npz")
    _add_source_options(data)
    data.add_argument("--out", required=True, metavar="DIR", help="run folder; holds the model when training ends")
    data.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    data.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    data.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_backbone_options(finetune, "the packaged all-MiniLM-L6-v2")
    finetune.add_argument("--image-size", type=int, default=64, help="side in pixels images are resized to (image data)")
    _add_dataclass_options(finetune.add_argument_group("training (lr is the head's)"), TrainConfig, FINETUNE_TRAIN_OPTIONS + ("checkpoint_every", "log_every"))
    _add_dataclass_options(finetune.add_argument_group("sparse head"), HeadConfig, ("k", "hidden_dim"), defaults={"k": FINETUNE_K})
    _add_dataclass_options(finetune.add_argument_group("end to end"), FinetuneConfig)

    reproduce = sub.add_parser(
        "reproduce",
        help="run the paper's comparison on the packaged default suite",
        description=(
            "Embed (cached), train dense / MRL / CSR / CSRv2-linear at every k, score every task, write "
            "results.json, results.md and two plots into --out, and print the table. A rerun reuses finished work."
        ),
    )
    _add_dataclass_options(reproduce, SuiteConfig, choices={"tasks": list(TASKS), "methods": list(METHODS)})
    reproduce.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _add_encoding_options(parser: argparse.ArgumentParser, flag: str, metavar: str, required: bool = True) -> None:
    """The options of every command that encodes an embeddings file with a trained head."""
    parser.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder written by `csrv2 train`")
    parser.add_argument(flag, dest="embeddings", required=required, metavar=metavar,
                        help="(n, d) float embeddings, .npy or the array 'embeddings' of an .npz")
    parser.add_argument("--k", type=int, default=None, help="non-zeros per code (default: the model's k); any k <= hidden_dim")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows encoded at once")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_source_options(parser) -> None:
    """How `read_source` reads a packaged split or a file: shared by embed and finetune."""
    parser.add_argument("--max-rows", type=int, default=None, help="seeded subset of a packaged split (default: all)")
    parser.add_argument("--text-column", default="text", help="text column of a table")
    parser.add_argument("--label-column", default="label", help="label column of a table; '' for none")
    parser.add_argument("--pairs", action="store_true", help="the file holds query/document pairs")
    parser.add_argument("--query-column", default="query", help="query column of a pairs file")
    parser.add_argument("--document-column", default="document", help="document column of a pairs file")


def _source(args: argparse.Namespace) -> dict:
    """The `read_source` keywords of the options `_add_source_options` added."""
    return {"pairs": args.pairs, "text_column": args.text_column, "label_column": args.label_column or None,
            "query_column": args.query_column, "document_column": args.document_column, "max_rows": args.max_rows}


def _add_backbone_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--backbone", default=None, help=f"sentence-transformers folder or hub name that embeds the texts (default: {default})")
    parser.add_argument("--max-seq-length", type=int, default=None, help="tokens kept per text (default: the model's, or the index's)")


def _given(args: argparse.Namespace, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def run_train(args: argparse.Namespace) -> None:
    from .data.training import load_training_data
    from .trainer import train

    data = load_training_data(args.embeddings, args.labels, args.documents)
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    head = train(
        data,
        preset_name=args.preset,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        **_given(args, HEAD_OPTIONS),
        **_given(args, train_fields),
    )
    from . import distributed

    if distributed.is_main():  # under torchrun, one line for the run
        print(f"wrote {args.out}: {head.config.input_dim} -> {head.config.hidden_dim} latents, k = {head.config.k}")


def _encode_file(args: argparse.Namespace):
    from .config import resolve_device
    from .data.training import load_array
    from .head import encode
    from .model import load_head

    head = load_head(args.model, resolve_device(args.device))
    embeddings = load_array(args.embeddings)
    return encode(head, embeddings, args.k, batch_size=args.batch_size, progress=False if args.no_progress else None)


def run_encode(args: argparse.Namespace) -> None:
    codes = _encode_file(args)
    codes.save(args.out)
    nnz = codes.nnz_per_row()
    print(f"wrote {args.out}: {len(codes)} codes, k = {codes.k}, non-zeros per row {nnz.min()}..{nnz.max()} (mean {np.mean(nnz):.2f})")


def run_index(args: argparse.Namespace) -> None:
    from .search.index import InvertedIndex

    if (args.data is None) == (args.embeddings is None):
        raise ValueError("give --embeddings (vectors) or --data (texts to embed), one of the two")
    if args.data is not None:
        from .data.embed import texts_of
        from .search.texts import build_text_index

        backbone, head = _text_model(args)
        texts = texts_of(args.data, split=args.split, text_column=args.text_column)
        index = build_text_index(head, backbone, texts, args.out, k=args.k, metric=args.metric, progress=not args.no_progress)
    else:
        index = InvertedIndex.build(_encode_file(args), metric=args.metric)
        index.save(args.out)
    print(f"wrote {args.out}: {index!r}, {index.bytes_per_vector():.2f} bytes per vector")


def _text_model(args: argparse.Namespace, backbone_options: bool = True):
    """(backbone, head) for texts: --model as a SparseEncoder folder (csrv2 finetune's or anyone's) brings both;
    with a csrv2 head folder the backbone is --backbone / --max-seq-length's (None unless backbone_options)."""
    from .config import resolve_device
    from .data.backbones import TextBackbone
    from .export import read_sparse_encoder
    from .model import load_head

    device = resolve_device(args.device)
    if (Path(args.model) / "modules.json").is_file():
        if args.backbone is not None:
            raise ValueError(f"{args.model} is a SparseEncoder folder and brings its own backbone; drop --backbone")
        backbone, head = read_sparse_encoder(args.model)
        if args.max_seq_length is not None:
            backbone.model.max_seq_length = args.max_seq_length
        return backbone, head.to(device)
    if not backbone_options:
        return None, load_head(args.model, device)
    return TextBackbone(args.backbone, device=args.device, max_seq_length=args.max_seq_length), load_head(args.model, device)


def run_search(args: argparse.Namespace) -> None:
    from .search.index import InvertedIndex

    if bool(args.texts) == (args.embeddings is not None):
        raise ValueError("give query texts or --queries (an embeddings file), one of the two")
    index = InvertedIndex.open(args.index)  # checked before the queries are encoded
    texts = None
    if args.texts:
        from .search.texts import query_backbone, read_texts, search_texts

        info = read_texts(args.index, index)
        own, head = _text_model(args, backbone_options=False)  # a SparseEncoder folder brings its backbone
        backbone = query_backbone(info, args.backbone, args.max_seq_length, args.device, own)
        ids, scores = search_texts(index, head, backbone, args.texts, args.top_n, args.k)
        texts = info["texts"] if info else None
    else:
        ids, scores = index.search(_encode_file(args), args.top_n)
    if args.out:
        from .atomic import write_file

        write_file(args.out, lambda f: np.savez(f, ids=ids, scores=scores))
    for q in range(min(len(ids), 10)):
        hits = [(i, s) for i, s in zip(ids[q], scores[q]) if i >= 0]
        label = repr(args.texts[q]) if args.texts else f"query {q}"
        if texts is not None:
            print(f"{label}:" + ("" if hits else " no document shares a latent with it"))
            for rank, (i, s) in enumerate(hits, 1):
                print(f"  {rank:>2}. id {i} ({s:.3f})  {' '.join(texts[i].split())[:100]}")
        else:
            print(f"{label}: " + (", ".join(f"{i} ({s:.3f})" for i, s in hits) or "no document shares a latent with it"))
    if len(ids) > 10:
        print(f"... {len(ids) - 10} more queries" + (f" in {args.out}" if args.out else "; pass --out to keep them all"))


def run_embed(args: argparse.Namespace) -> None:
    from . import distributed
    from .config import resolve_device
    from .data.embed import embed_source, save_arrays, save_shard

    out = Path(args.out)
    if out.suffix not in ("", ".npz") and not out.is_dir():
        raise ValueError(f"{out}: give a path ending in .npz, or a folder (a name without a suffix) for .npy shards")
    device = distributed.init(resolve_device(args.device))  # under torchrun: one shard per rank
    if out.suffix == ".npz" and distributed.world_size() > 1:
        raise ValueError(f"{out}: under torchrun every rank writes a shard; pass a folder as --out")
    if out.suffix != ".npz":
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out}: exists and is not a folder; pass a .npz file or a folder for shards")
        if out.is_dir() and any(out.glob("*-[0-9]*.npy")) and not args.overwrite:
            raise ValueError(f"{out}: already holds shards; pass --overwrite to replace them or choose another folder")
        distributed.barrier()  # every rank has looked before rank 0 clears the folder
        if distributed.is_main():
            for old in out.glob("*-[0-9]*.npy"):
                old.unlink()
        distributed.barrier()
    arrays = embed_source(
        args.data, split=args.split, seed=args.seed, model=args.model, max_seq_length=args.max_seq_length, image_size=args.image_size,
        batch_size=args.batch_size, device=str(device), cache_dir=args.cache_dir, progress=not args.no_progress and distributed.is_main(),
        part=(distributed.rank(), distributed.world_size()), **_source(args),
    )
    if out.suffix == ".npz":
        save_arrays(arrays, out)
    else:
        save_shard(arrays, out, distributed.rank())
    distributed.barrier()
    if distributed.is_main():
        shards = f" ({distributed.world_size()} shards)" if out.suffix != ".npz" else ""
        print(f"wrote {out}{shards}: " + ", ".join(f"{name} {a.shape}" for name, a in arrays.items()) + (" from rank 0" if shards else ""))


def run_export(args: argparse.Namespace) -> None:
    from .data.backbones import TextBackbone
    from .export import export_sparse_encoder
    from .model import load_head, read_settings

    head = load_head(args.model)
    settings = read_settings(args.model)
    backbone = TextBackbone(args.backbone, max_seq_length=args.max_seq_length)
    export_sparse_encoder(head, args.out, backbone, settings={**settings, "backbone": backbone.name}, overwrite=args.overwrite)
    print(f"wrote {args.out}: SparseEncoder({backbone.name} -> {head.config.hidden_dim} latents, k = {head.config.k})")


def run_finetune(args: argparse.Namespace) -> None:
    from .data.backbones import ImageBackbone, TextBackbone
    from .data.embed import read_source
    from .finetune import Finetuner

    items = read_source(args.data, **_source(args))
    if "images" in items:
        backbone, inputs = ImageBackbone(args.image_size), items["images"]
    else:
        backbone, inputs = TextBackbone(args.backbone, max_seq_length=args.max_seq_length), items.get("texts", items.get("queries"))
    ft = FinetuneConfig(**{name: tuple(v) if isinstance(v, list) else v for name, v in _given(args, [f.name for f in dataclasses.fields(FinetuneConfig)]).items()})
    train_fields = FINETUNE_TRAIN_OPTIONS + ("checkpoint_every", "log_every")
    trained, head = Finetuner(
        backbone, inputs, items.get("labels"), items.get("documents"),
        k=args.k or FINETUNE_K, hidden_dim=args.hidden_dim or 0, train=TrainConfig(**_given(args, train_fields)),
        finetune=ft, out=args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
    ).fit()
    if head is None:
        print(f"wrote {args.out}: {trained.name}, Matryoshka-trained: truncate its embeddings to any of {ft.mrl_dims}")
    else:
        kind = "SparseEncoder" if isinstance(trained, TextBackbone) else "image model"
        print(f"wrote {args.out}: {kind}({trained.name} -> {head.config.hidden_dim} latents, k = {head.config.k})")


def run_reproduce(args: argparse.Namespace) -> None:
    from .eval.report import markdown_table, target_lines
    from .eval.suite import reproduce

    config = SuiteConfig(**{name: tuple(v) if isinstance(v, list) else v for name, v in _given(args, [f.name for f in dataclasses.fields(SuiteConfig)]).items()})
    results = reproduce(config, progress=not args.no_progress)
    print(markdown_table(results))
    print("\n".join(target_lines(results)))
    print(f"wrote {config.out}: results.json, results.md, score_vs_k.png, dead_latents_vs_k.png")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": run_train, "encode": run_encode, "index": run_index, "search": run_search, "embed": run_embed, "export": run_export, "finetune": run_finetune, "reproduce": run_reproduce}
        commands[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # InputError is a ValueError: bad input, said in one line
        print(f"csrv2: error: {e}", file=sys.stderr)
        return 2
    finally:
        from . import distributed

        distributed.close()
    return 0
