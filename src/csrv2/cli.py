"""`csrv2` (and `python -m csrv2`): a thin shell over the Python API. Each command parses options,
builds its configs and calls the API, and turns bad input into one line on stderr with exit status 2.

The options of a config come from its dataclass (options.py): its fields, types, docstrings and
defaults. A command's options are added only when that command runs (or shows its help), and heavy
modules are imported inside the run_* functions, so `csrv2 encode` loads neither the end-to-end
trainer nor the evaluation suite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import DEFAULT_QUERY_K, PRESETS, VISION_RECIPE, HeadConfig, TrainConfig
from .errors import InputError
from .options import Command, add_dataclass_options, field_names, given

HEAD_OPTIONS = ("k", "hidden_dim", "k_aux", "normalize", "dead_threshold")
# The TrainConfig fields end-to-end training reads (its contrastive form follows the data).
FINETUNE_TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "adam_eps", "anneal", "k_init", "decay_ratio", "multi_k_coef",
                          "aux_coef", "cl_coef", "temperature", "seed", "device", "checkpoint_every", "log_every", "tf32")
DEVICE_HELP = "auto (the accelerator if there is one, else cpu), cpu, cuda, cuda:N or mps"
DEFAULT_BACKBONE = "the packaged all-MiniLM-L6-v2"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each command's options are added when it is used (options.Command)."""
    parser = argparse.ArgumentParser(
        prog="csrv2",
        description="Ultra-sparse embeddings: train CSRv2 sparse heads on dense embeddings and encode k-sparse codes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Command)
    sub.add_parser(
        "train",
        help="train a sparse head on embeddings",
        description=(
            "Train a CSRv2 sparse head on dense embeddings and write a model folder. "
            "Inputs are NumPy files: .npy (memory-mapped) or .npz whose arrays are named "
            "'embeddings' (+ optional 'labels'), or 'queries' and 'documents' for query/document pairs. "
            "Every option overrides the preset."
        ),
        add_options=_train_options,
    )
    sub.add_parser(
        "encode",
        help="encode embeddings into k-sparse codes",
        description="Encode dense embeddings with a trained head. Writes an .npz with 'indices' and 'values', each (n, k), and 'dim'.",
        add_options=_encode_options,
    )
    sub.add_parser("index", help="build an inverted index of codes", add_options=_index_commands)
    sub.add_parser(
        "search",
        help="search an index with query embeddings",
        description=(
            "Encode queries with the head that built the index and print (or save) their top hits: query texts "
            "(embedded by the index's backbone, hits printed with their texts) or a --queries embeddings file."
        ),
        add_options=_search_options,
    )
    sub.add_parser(
        "embed",
        help="embed texts or images with a backbone (cached)",
        description=(
            "Embed a packaged data set's split, or a file: .csv/.jsonl/.parquet with a text and a label column "
            "(or query/document columns with --pairs), or an .npz of 'images' and 'labels'. Writes an .npz that "
            "`csrv2 train --embeddings` reads: 'embeddings' (+ 'labels'), or 'queries' and 'documents'. "
            "Embeddings are cached by model and data content, so a second run does not embed again."
        ),
        add_options=_embed_options,
    )
    sub.add_parser(
        "export",
        help="write backbone + head as a sentence-transformers SparseEncoder folder",
        description="Write a folder that sentence_transformers.SparseEncoder(path) loads: the backbone's modules, then the "
                    "head as its SparseAutoEncoder module; csrv2's training settings go to csrv2.json. Written whole or not at all.",
        add_options=_export_options,
    )
    sub.add_parser(
        "finetune",
        help="train a backbone and a sparse head together (end-to-end CSRv2), or a backbone alone as a Matryoshka peer",
        description="Train a backbone end to end on texts with labels (supervised loss) or query/document pairs (pairs loss), "
                    "or on images with labels: with a CSRv2 head (--objective csrv2; texts give a sentence-transformers "
                    "SparseEncoder folder) or alone with nested-prefix losses (--objective matryoshka). Checkpoints every "
                    "epoch into --out; --resume continues an interrupted run.",
        add_options=_finetune_options,
    )
    sub.add_parser(
        "reproduce",
        help="run the paper's comparison on the packaged default suite, or on your own data (--data)",
        description=(
            "Embed (cached), train dense / MRL / CSR / CSRv2-linear at every k, score every task, write "
            "results.json, results.md and two plots into --out, and print the table. A rerun reuses finished work. "
            "--data scores your files instead (or beside the --tasks named): a labelled table, a pairs table (--pairs) "
            "or an .npz of embeddings."
        ),
        add_options=_reproduce_options,
    )
    return parser


def _train_options(train: argparse.ArgumentParser) -> None:
    io = train.add_argument_group("data and output")
    io.add_argument("--embeddings", required=True, metavar="E.npy", help="(n, d) float embeddings, .npy or .npz (see above)")
    io.add_argument("--labels", metavar="Y.npy",
                    help="(n,) labels (ints or strings), .npy or .npz array 'labels': enables the supervised contrastive loss")
    io.add_argument("--documents", metavar="D.npy",
                    help="(n, d) documents paired row by row with --embeddings as queries: enables the pairs loss")
    io.add_argument("--out", required=True, metavar="MODEL_DIR",
                    help="run folder: the model, train_log.jsonl and checkpoints are written here")
    _add_run_options(io, resume="continue the run in --out from its last checkpoint",
                     overwrite="start over in an --out that already holds a run")
    train.add_argument("--preset", choices=PRESETS, default="csrv2", help="csrv2: k-annealing + supervised (labels) or pairs (documents) "
                       "contrastive; csr: CSR v1, fixed k, pairs (documents) or self-supervised contrastive, labels unused")
    add_dataclass_options(train.add_argument_group("sparse head"), HeadConfig, HEAD_OPTIONS)
    add_dataclass_options(train.add_argument_group("training (defaults: the csrv2 preset)"), TrainConfig)


def _encode_options(encode: argparse.ArgumentParser) -> None:
    _add_encoding_options(encode, "--embeddings", "E.npy")
    encode.add_argument("--out", required=True, metavar="CODES.npz", help="output file")


def _index_commands(index: argparse.ArgumentParser) -> None:
    sub = index.add_subparsers(dest="index_command", required=True, parser_class=Command)
    sub.add_parser(
        "build",
        help="encode embeddings and index their codes",
        description="Encode dense embeddings with a trained head and write an inverted index file (exact top-n search).",
        add_options=_index_build_options,
    )


def _index_build_options(build: argparse.ArgumentParser) -> None:
    _add_encoding_options(build, "--embeddings", "E.npy", required=False)
    build.add_argument("--data", metavar="NAME|FILE", help="texts instead of --embeddings: a packaged data set (its --split) or a "
                       ".csv/.jsonl/.parquet file (its --text-column); they are embedded with --backbone and kept beside the index")
    build.add_argument("--split", choices=("train", "test"), default="test", help="split of a packaged data set")
    build.add_argument("--text-column", default="text", help="text column of a file")
    _add_backbone_options(build, DEFAULT_BACKBONE)
    build.add_argument("--metric", choices=("ip", "cosine"), default="cosine", help="score: inner product, or cosine of the codes")
    build.add_argument("--out", required=True, metavar="INDEX", help="index file, written atomically")


def _search_options(search: argparse.ArgumentParser) -> None:
    search.add_argument("--index", required=True, metavar="INDEX", help="file written by `csrv2 index build`")
    search.add_argument("texts", nargs="*", metavar="QUERY", help="query texts")
    _add_encoding_options(search, "--queries", "Q.npy", required=False,
                          k_help=f"latents per query code, whatever k the documents were indexed at (default: {DEFAULT_QUERY_K}, "
                                 "or the model's k if larger): more touches more posting lists and finds more")
    _add_backbone_options(search, "the index's")
    search.add_argument("--dense", action="store_true",
                        help="score each query's dense projection against the stored codes, decoded: exact, reads every posting list")
    search.add_argument("--top-n", type=int, default=10, help="hits per query")
    search.add_argument("--out", metavar="HITS.npz",
                        help="also write 'ids' and 'scores', each (q, top_n); -1 / -inf pad rows with fewer hits")


def _embed_options(embed: argparse.ArgumentParser) -> None:
    from .data.datasets import DATASETS

    embed.add_argument("--data", required=True, metavar="NAME|FILE", help=f"a packaged data set ({', '.join(DATASETS)}) or a file")
    embed.add_argument("--out", required=True, metavar="E.npz|DIR",
                       help="a .npz file, or a folder of .npy shards (one per rank under torchrun); written atomically")
    embed.add_argument("--overwrite", action="store_true", help="replace the shards a folder --out already holds")
    embed.add_argument("--split", choices=("train", "test"), default="train", help="split of a packaged data set")
    _add_source_options(embed)
    embed.add_argument("--model", default=None, help=f"sentence-transformers folder or hub name (default: {DEFAULT_BACKBONE})")
    embed.add_argument("--max-seq-length", type=int, default=None, help="tokens kept per text (default: the model's)")
    embed.add_argument("--image-size", type=int, default=64, help="side images are resized to for EfficientNet-Lite0")
    embed.add_argument("--batch-size", type=int, default=32, help="texts embedded at once")
    embed.add_argument("--device", default="auto", help=DEVICE_HELP)
    embed.add_argument("--seed", type=int, default=0, help="seed of packaged splits and subsets")
    embed.add_argument("--cache-dir", default=None, help="embedding cache (default: $CSRV2_CACHE or ~/.cache/csrv2)")
    embed.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _export_options(export: argparse.ArgumentParser) -> None:
    export.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder written by `csrv2 train`")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_backbone_options(export, DEFAULT_BACKBONE)


def _finetune_options(finetune: argparse.ArgumentParser) -> None:
    from .finetune import DEFAULT_K, FINETUNE_EPOCHS, FinetuneConfig

    data = finetune.add_argument_group("data and output")
    data.add_argument("--data", required=True, metavar="NAME|FILE",
                      help="a packaged data set's train split, a .csv/.jsonl/.parquet table or an image .npz")
    _add_source_options(data)
    data.add_argument("--out", required=True, metavar="DIR", help="run folder; holds the model when training ends")
    _add_run_options(data, resume="continue the run in --out from its newest checkpoint", overwrite="replace an existing --out")
    _add_backbone_options(finetune, DEFAULT_BACKBONE)
    finetune.add_argument("--image-size", type=int, default=64, help="side in pixels images are resized to (image data)")
    training = finetune.add_argument_group(
        "training (lr is the head's)",
        f"End to end trains the backbone too, so --epochs defaults to {FINETUNE_EPOCHS}, not the {TrainConfig.epochs} of head-only "
        f"training; on images --lr and --aux-coef default to the paper's vision recipe, "
        f"{VISION_RECIPE['lr']} and {VISION_RECIPE['aux_coef']}.")
    add_dataclass_options(training, TrainConfig, FINETUNE_TRAIN_OPTIONS, defaults={"epochs": FINETUNE_EPOCHS})
    add_dataclass_options(finetune.add_argument_group("sparse head"), HeadConfig, ("k", "hidden_dim"), defaults={"k": DEFAULT_K})
    add_dataclass_options(finetune.add_argument_group("end to end"), FinetuneConfig)


def _reproduce_options(reproduce: argparse.ArgumentParser) -> None:
    from .eval.suite import METHODS, SuiteConfig
    from .eval.tasks import TASKS

    add_dataclass_options(reproduce, SuiteConfig, choices={"tasks": TASKS, "methods": METHODS})
    reproduce.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_encoding_options(parser: argparse.ArgumentParser, flag: str, metavar: str, required: bool = True,
                          k_help: str = "non-zeros per code (default: the model's k); any k <= hidden_dim") -> None:
    """The options of every command that encodes an embeddings file with a trained head."""
    parser.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder written by `csrv2 train`")
    parser.add_argument(flag, dest="embeddings", required=required, metavar=metavar,
                        help="(n, d) float embeddings, .npy or the array 'embeddings' of an .npz")
    parser.add_argument("--k", type=int, default=None, help=k_help)
    parser.add_argument("--batch-size", type=int, default=4096, help="rows encoded at once")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_run_options(parser, resume: str, overwrite: str) -> None:
    """What a training command does with an --out that already holds a run."""
    parser.add_argument("--resume", action="store_true", help=resume)
    parser.add_argument("--overwrite", action="store_true", help=overwrite)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


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
    parser.add_argument("--backbone", default=None,
                        help=f"sentence-transformers folder or hub name that embeds the texts (default: {default})")
    parser.add_argument("--max-seq-length", type=int, default=None, help="tokens kept per text (default: the model's, or the index's)")


def _encoding(args: argparse.Namespace) -> dict:
    """The `encode_file` keywords of the options `_add_encoding_options` added."""
    return {"k": args.k, "batch_size": args.batch_size, "progress": False if args.no_progress else None}


def _file_out(path: str | None) -> None:
    """Refuse an output path that is a folder before any work (the atomic writer would refuse it only at the end)."""
    if path is not None and Path(path).is_dir():
        raise InputError(f"{path}: is a folder; pass a file path to write")


def _query_texts(texts: list[str]) -> list[str]:
    """Query texts from the command line. An argument that is not UTF-8 arrives with lone surrogates in
    place of its bytes (PEP 383), which no tokenizer takes."""
    for number, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"query {number} ({text!r}) is not UTF-8 text; pass queries in UTF-8 (check the terminal's encoding)") from e
    return texts


def _say(line: str) -> None:
    """Print on one process only: under torchrun every rank runs the command."""
    from .distributed import is_main

    if is_main():
        print(line)


def run_train(args: argparse.Namespace) -> None:
    from .data.training import load_training_data
    from .trainer import train

    data = load_training_data(args.embeddings, args.labels, args.documents)
    head = train(data, preset_name=args.preset, out=args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                 **given(args, HEAD_OPTIONS), **given(args, field_names(TrainConfig)))
    _say(f"wrote {args.out}: {head.config.input_dim} -> {head.config.hidden_dim} latents, k = {head.config.k}")


def run_encode(args: argparse.Namespace) -> None:
    from .model import encode_file, load_head

    _file_out(args.out)
    codes = encode_file(load_head(args.model, args.device), args.embeddings, **_encoding(args))
    codes.save(args.out)
    nnz = codes.nnz_per_row()
    print(f"wrote {args.out}: {len(codes)} codes, k = {codes.k}, non-zeros per row {nnz.min()}..{nnz.max()} (mean {nnz.mean():.2f})")


def run_index(args: argparse.Namespace) -> None:
    if (args.data is None) == (args.embeddings is None):
        raise InputError("give --embeddings (vectors) or --data (texts to embed), one of the two")
    _file_out(args.out)
    if args.data is not None:
        from .data.embed import texts_of
        from .search.texts import build_text_index, load_text_model

        texts = texts_of(args.data, split=args.split, text_column=args.text_column)
        backbone, head = load_text_model(args.model, args.backbone, args.max_seq_length, args.device)
        index = build_text_index(head, backbone, texts, args.out, k=args.k, metric=args.metric, progress=not args.no_progress)
    else:
        from .model import encode_file, load_head
        from .search.index import InvertedIndex

        head = load_head(args.model, args.device)
        index = InvertedIndex.build(encode_file(head, args.embeddings, **_encoding(args)), metric=args.metric, head_digest=head.digest())
        index.save(args.out)
    print(f"wrote {args.out}: {index!r}, {index.bytes_per_vector():.2f} bytes per vector")


def run_search(args: argparse.Namespace) -> None:
    from .search.index import InvertedIndex

    if bool(args.texts) == (args.embeddings is not None):
        raise InputError("give query texts or --queries (an embeddings file), one of the two")
    queries = _query_texts(args.texts)
    _file_out(args.out)
    index = InvertedIndex.open(args.index)  # checked before the queries are encoded
    texts = None
    if queries:
        from .search.texts import load_text_model, query_backbone, read_texts, search_texts

        info = read_texts(args.index, index)
        own, head = load_text_model(args.model, args.backbone, args.max_seq_length, args.device, load_backbone=False)
        device = str(next(head.parameters()).device)  # the query backbone runs where the head does
        backbone = query_backbone(info, args.backbone, args.max_seq_length, device, own)
        ids, scores = search_texts(index, head, backbone, queries, args.top_n, args.k, args.dense)
        texts = info["texts"] if info else None
    else:
        from .model import load_array, load_head
        from .search.queries import encode_queries

        head = load_head(args.model, args.device)
        index.check_head(head)  # another head's codes would land on other latents: silently wrong hits
        ids, scores = index.search(encode_queries(head, load_array(args.embeddings), args.k, args.dense, batch_size=args.batch_size,
                                                  progress=False if args.no_progress else None), args.top_n)
    if args.out:
        import numpy as np

        from .atomic import write_file

        write_file(args.out, lambda f: np.savez(f, ids=ids, scores=scores))
    _print_hits(ids, scores, queries, texts, args.out)


def _print_hits(ids, scores, queries: list[str], texts: list[str] | None, out: str | None) -> None:
    """The hits of the first 10 queries: ids and scores, and the hits' texts when the index keeps them."""
    for q in range(min(len(ids), 10)):
        hits = [(i, s) for i, s in zip(ids[q], scores[q], strict=True) if i >= 0]
        label = repr(queries[q]) if queries else f"query {q}"
        if texts is not None:
            print(f"{label}:" + ("" if hits else " no document shares a latent with it"))
            for rank, (i, s) in enumerate(hits, 1):
                print(f"  {rank:>2}. id {i} ({s:.3f})  {' '.join(texts[i].split())[:100]}")
        else:
            print(f"{label}: " + (", ".join(f"{i} ({s:.3f})" for i, s in hits) or "no document shares a latent with it"))
    if len(ids) > 10:
        print(f"... {len(ids) - 10} more queries" + (f" in {out}" if out else "; pass --out to keep them all"))


def run_embed(args: argparse.Namespace) -> None:
    from .data.embed import embed_to

    arrays, shards = embed_to(
        args.out, args.data, overwrite=args.overwrite, device=args.device, progress=not args.no_progress, split=args.split,
        seed=args.seed, model=args.model, max_seq_length=args.max_seq_length, image_size=args.image_size, batch_size=args.batch_size,
        cache_dir=args.cache_dir, **_source(args),
    )
    where = f"{args.out} ({shards} shards)" if shards else args.out
    _say(f"wrote {where}: " + ", ".join(f"{name} {a.shape}" for name, a in arrays.items()) + (" from rank 0" if shards else ""))


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
    from .data.backbones import TextBackbone
    from .data.embed import backbone_for, read_source
    from .finetune import FINETUNE_EPOCHS, FinetuneConfig, Finetuner

    ft = FinetuneConfig(**given(args, field_names(FinetuneConfig)))
    items = read_source(args.data, **_source(args))
    recipe = VISION_RECIPE if "images" in items else {}
    train = TrainConfig(**{"epochs": FINETUNE_EPOCHS, **recipe, **given(args, FINETUNE_TRAIN_OPTIONS)})
    backbone = backbone_for(items, args.backbone, max_seq_length=args.max_seq_length, image_size=args.image_size)
    inputs = items.get("images", items.get("texts", items.get("queries")))
    trained, head = Finetuner(
        backbone, inputs, items.get("labels"), items.get("documents"), **given(args, ("k", "hidden_dim")), train=train, finetune=ft,
        out=args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
    ).fit()
    if head is None:
        _say(f"wrote {args.out}: {trained.name}, Matryoshka-trained: truncate its embeddings to any of {ft.mrl_dims}")
    else:
        kind = "SparseEncoder" if isinstance(trained, TextBackbone) else "image model"
        _say(f"wrote {args.out}: {kind}({trained.name} -> {head.config.hidden_dim} latents, k = {head.config.k})")


def run_reproduce(args: argparse.Namespace) -> None:
    from .eval.report import markdown_table, target_lines
    from .eval.suite import SuiteConfig, reproduce

    fields = given(args, field_names(SuiteConfig))
    if args.data and args.tasks is None:  # the user's data alone, unless packaged tasks are named too
        fields["tasks"] = ()
    config = SuiteConfig(**fields)
    results = reproduce(config, progress=not args.no_progress)
    print(markdown_table(results))
    print("\n".join(target_lines(results)))
    print(f"wrote {config.out}: results.json, results.md, score_vs_k.png, dead_latents_vs_k.png")


COMMANDS = {"train": run_train, "encode": run_encode, "index": run_index, "search": run_search, "embed": run_embed,
            "export": run_export, "finetune": run_finetune, "reproduce": run_reproduce}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import distributed

    try:
        COMMANDS[args.command](args)
        distributed.barrier()  # every rank is done before any leaves: gloo aborts a rank whose peer hangs up first
    except (ValueError, FileNotFoundError, UnicodeError) as e:  # InputError is a ValueError: bad input, said in one line
        print("csrv2: error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    finally:
        distributed.close()
    return 0
