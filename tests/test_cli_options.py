"""The dataclass -> command-line mapping: every field type parses to its own Python type, help comes from
the field's docstring, a type with no exact form is refused, and building the parser stays light."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Literal

import pytest

from csrv2.cli import build_parser, main
from csrv2.config import HeadConfig, TrainConfig
from csrv2.options import Command, add_dataclass_options, argument_kwargs, field_names, given


@dataclass(frozen=True)
class Every:
    """One field of each type the mapping knows."""

    switch: bool = True
    """A switch."""
    count: int = 3
    """How many: 100% of them."""
    rate: float = 0.5
    """A rate."""
    name: str = "x"
    """A name."""
    limit: int | None = None
    """An optional count."""
    scale: float | None = None
    """An optional rate."""
    mode: Literal["a", "b"] = "a"
    """One of two names."""
    level: Literal[1, 2, 4] = 2
    """One of three numbers."""
    sizes: tuple[int, ...] = (2, 8)
    """Several counts."""
    words: tuple[str, ...] = ("p",)
    """Several names."""


def parser_of(cls, **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_dataclass_options(parser, cls, **kwargs)
    return parser


def test_every_type_parses_to_its_python_type():
    args = parser_of(Every).parse_args(["--no-switch", "--count", "7", "--rate", "1e-3", "--name", "y", "--limit", "5",
                                        "--scale", "2.5", "--mode", "b", "--level", "4", "--sizes", "1", "32", "--words", "q", "r"])
    values = given(args, field_names(Every))
    assert values == {"switch": False, "count": 7, "rate": 1e-3, "name": "y", "limit": 5, "scale": 2.5, "mode": "b", "level": 4,
                      "sizes": (1, 32), "words": ("q", "r")}
    assert [type(values[n]) for n in ("count", "rate", "limit", "scale", "level")] == [int, float, int, float, int]
    assert Every(**values).sizes == (1, 32)  # the dataclass gets tuples, not lists
    assert parser_of(Every).parse_args(["--switch"]).switch is True


def test_unset_options_stay_none_so_the_dataclass_default_applies():
    args = parser_of(Every).parse_args([])
    assert all(getattr(args, name) is None for name in field_names(Every))
    assert given(args, field_names(Every)) == {} and Every(**given(args, field_names(Every))) == Every()


@pytest.mark.parametrize("argv", [["--count", "2.5"], ["--scale", "abc"], ["--mode", "c"], ["--level", "3"], ["--sizes", "a"]])
def test_values_of_the_wrong_type_are_refused(argv):
    with pytest.raises(argparse.ArgumentError):
        parser_of(Every).parse_args(argv)


def test_names_defaults_and_choices():
    parser = parser_of(Every, names=("count", "words"), defaults={"count": 9}, choices={"words": ("p", "q")})
    assert given(parser.parse_args(["--count", "1", "--words", "q"]), field_names(Every)) == {"count": 1, "words": ("q",)}
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--words", "z"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--rate", "1"])  # not among names
    text = parser.format_help()
    assert "How many: 100% of them. (default: 9)" in " ".join(text.split())
    with pytest.raises(TypeError, match="no fields"):
        parser_of(Every, names=("cuont",))


def test_help_is_the_docstring_and_the_default():
    text = " ".join(parser_of(Every).format_help().split())
    for snippet in ["--switch, --no-switch A switch. (default: True)", "--rate RATE A rate. (default: 0.5)",
                    "--limit LIMIT An optional count.", "--mode {a,b} One of two names. (default: a)",
                    "--sizes SIZES [SIZES ...] Several counts. (default: 2 8)"]:
        assert snippet in text
    assert "An optional count. (default" not in text  # None is not a default worth printing


@pytest.mark.parametrize("hint", [list[int], dict[str, int], tuple[int, int], tuple[float, str], int | str, Literal["a", 1],
                                  Literal[True, False], tuple[bool, ...], bytes, object, argparse.Namespace])
def test_types_without_an_exact_form_are_refused(hint):
    with pytest.raises(TypeError, match="no command-line form"):
        argument_kwargs(hint)


@dataclass(frozen=True)
class Odd:
    size: int = 1
    pairs: dict[str, int] = dataclasses.field(default_factory=dict)


def test_a_dataclass_with_an_unknown_field_type_fails_at_build_time():
    with pytest.raises(TypeError, match="no command-line form"):
        parser_of(Odd)


def test_configs_map_exactly():
    """The real configs: an optional float stays a float, annotations are resolved, not read as text."""
    parser = parser_of(TrainConfig)
    args = parser.parse_args(["--k-init", "16", "--lr", "3e-4", "--contrastive", "pairs", "--no-anneal"])
    assert given(args, field_names(TrainConfig)) == {"k_init": 16, "lr": 3e-4, "contrastive": "pairs", "anneal": False}
    assert TrainConfig(**given(args, field_names(TrainConfig))).k_init == 16
    assert given(parser_of(HeadConfig, names=("k", "normalize")).parse_args(["--k", "0", "--normalize"]), ("k", "normalize")) == {
        "k": 0, "normalize": True}  # k = 0 reaches HeadConfig, which refuses it


COMMANDS = ["train", "encode", "index build", "search", "embed", "export", "finetune", "reproduce"]


def test_help_of_every_command_renders(capsys):
    from csrv2.eval.suite import SuiteConfig
    from csrv2.finetune import FinetuneConfig

    expected = {"train": [TrainConfig, HeadConfig], "finetune": [FinetuneConfig], "reproduce": [SuiteConfig]}
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([*name.split(), "--help"])
        text = capsys.readouterr().out
        assert exit_.value.code == 0 and text.startswith(f"usage: csrv2 {name}") and "--out" in text or name == "reproduce", name
        for cls in expected.get(name, []):
            for field in field_names(cls):
                if field != "input_dim":  # the head's input dimension comes from the data
                    assert "--" + field.replace("_", "-") in text, (name, field)


def test_every_command_defaults_to_the_auto_device():
    parser = build_parser()
    for argv in (["encode", "--model", "m", "--embeddings", "e", "--out", "o"], ["index", "build", "--model", "m", "--out", "o"],
                 ["search", "--index", "i", "--model", "m", "q"], ["embed", "--data", "d", "--out", "o"]):
        assert parser.parse_args(argv).device == "auto", argv
    for argv in (["train", "--embeddings", "e", "--out", "o"], ["finetune", "--data", "d", "--out", "o"], ["reproduce"]):
        assert parser.parse_args(argv).device is None, argv  # the configs' own default, auto
    assert TrainConfig().device == "auto"


def test_building_the_parser_and_encoding_load_neither_training_end_to_end_nor_evaluation(tmp_path):
    import numpy as np
    import torch

    from csrv2 import HeadConfig, SparseHead, save

    save(SparseHead(HeadConfig(8, 32, 2), torch.Generator().manual_seed(0)), tmp_path / "model")
    np.save(tmp_path / "e.npy", np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32))
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        from csrv2 import cli
        cli.build_parser()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            cli.main(["encode", "--help"])
        assert cli.main(["encode", "--model", {str(tmp_path / "model")!r}, "--embeddings", {str(tmp_path / "e.npy")!r},
                         "--out", {str(tmp_path / "c.npz")!r}]) == 0
        print(sorted(m for m in sys.modules if m.startswith("csrv2.")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    loaded = out.strip().splitlines()[-1]
    assert "csrv2.cli" in loaded and "csrv2.model" in loaded
    assert "csrv2.eval" not in loaded and "csrv2.finetune" not in loaded, loaded
    assert (tmp_path / "c.npz").is_file()


def test_a_command_adds_its_options_once_and_only_when_used():
    calls = []

    def add(parser):
        calls.append(1)
        parser.add_argument("--x", type=int)

    command = Command(prog="t", add_options=add)
    assert calls == []
    assert command.parse_args(["--x", "3"]).x == 3 and "--x" in command.format_help()
    assert calls == [1]
