"""`csrv2` (and `python -m csrv2`): a thin shell over the Python API. Each command parses options,
makes one API call, and turns bad input into one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from .config import CONTRASTIVE_MODES, PRESETS, HeadConfig, TrainConfig, field_docs

HEAD_OPTIONS = ("k", "hidden_dim", "k_aux", "normalize", "dead_threshold")


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, names=None) -> None:
    """One --option per dataclass field, its help the field's docstring; unset options stay None."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "") + ("" if f.default is None else f" (default: {f.default})")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "contrastive":
            parser.add_argument(flag, choices=CONTRASTIVE_MODES, default=None, help=help_text)
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
    enc.add_argument("--model", required=True, metavar="MODEL_DIR", help="model folder written by `csrv2 train`")
    enc.add_argument("--embeddings", required=True, metavar="E.npy", help="(n, d) float embeddings, .npy or the array 'embeddings' of an .npz")
    enc.add_argument("--k", type=int, default=None, help="non-zeros per code (default: the model's k); any k <= hidden_dim")
    enc.add_argument("--out", required=True, metavar="CODES.npz", help="output file")
    enc.add_argument("--batch-size", type=int, default=4096, help="rows encoded at once")
    enc.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    enc.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _given(args: argparse.Namespace, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def run_train(args: argparse.Namespace) -> None:
    from .data import load_training_data
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
    print(f"wrote {args.out}: {head.config.input_dim} -> {head.config.hidden_dim} latents, k = {head.config.k}")


def run_encode(args: argparse.Namespace) -> None:
    from .codes import encode
    from .config import resolve_device
    from .data import load_array
    from .model import load_head

    head = load_head(args.model, resolve_device(args.device))
    embeddings = load_array(args.embeddings)
    codes = encode(head, embeddings, args.k, batch_size=args.batch_size, progress=False if args.no_progress else None)
    codes.save(args.out)
    nnz = codes.nnz_per_row()
    print(f"wrote {args.out}: {len(codes)} codes, k = {codes.k}, non-zeros per row {nnz.min()}..{nnz.max()} (mean {np.mean(nnz):.2f})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"train": run_train, "encode": run_encode}[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # InputError is a ValueError: bad input, said in one line
        print(f"csrv2: error: {e}", file=sys.stderr)
        return 2
    return 0
