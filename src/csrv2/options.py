"""Command-line options generated from the config dataclasses, and the parser pieces the commands share.

Each dataclass field becomes `--field-name`, parsed into the field's own type (read from its resolved
annotation), its help the docstring written under the field plus its default. Unset options stay None,
so a command passes on only what was given and every default stays where the dataclass (or API) sets it.
A field type without an exact command-line form raises TypeError when the parser is built, so a new
field can never silently parse as a string.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Literal

from .config import field_docs

SCALARS = (int, float, str)


class StoreTuple(argparse.Action):
    """Store the values of an nargs="+" option as a tuple, the type of the field they fill."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, tuple(values))


def _unwrap_optional(hint):
    """X for `X | None` (or Optional[X]); None for any other type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if len(args) == 2 and type(None) in args:
            return next(a for a in args if a is not type(None))
    return None


def argument_kwargs(hint) -> dict:
    """The `add_argument` keywords that parse one value of the type `hint` exactly.

    bool -> --x/--no-x; int, float, str -> that type; X | None -> X's form (unset: None); Literal[...]
    -> its values as choices, parsed to their type; tuple[X, ...] of a scalar X -> one or more values,
    stored as a tuple. Anything else raises TypeError.
    """
    inner = _unwrap_optional(hint)
    if inner is not None:
        return argument_kwargs(inner)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in SCALARS:
        return {"type": hint}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal and args and len({type(a) for a in args}) == 1 and type(args[0]) in SCALARS:
        return {"type": type(args[0]), "choices": args}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in SCALARS:
        return {"type": args[0], "nargs": "+", "action": StoreTuple}
    raise TypeError(f"no command-line form for the type {hint!r}; use bool, int, float, str, X | None, Literal[...] or tuple[X, ...]")


def _shown(value) -> str:
    """A default as it is typed on the command line: tuples as space-separated values."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def help_text(doc: str, default) -> str:
    """The field's docstring and its default (none shown for None or a required field); % escaped for argparse."""
    shown = "" if default is None or default is dataclasses.MISSING else f" (default: {_shown(default)})"
    return (doc + shown).replace("%", "%%")


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def add_dataclass_options(parser, cls, names: Iterable[str] | None = None, *, defaults: dict | None = None,
                          choices: dict | None = None) -> None:
    """One --option per field of the dataclass `cls` (only those in `names`, in field order).

    defaults: the default a command uses instead of the field's own, for the help; choices: the values
    a field (e.g. a tuple of names) may take.
    """
    defaults, choices = defaults or {}, choices or {}
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    unknown = set(names or ()) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    docs = field_docs(cls)
    for f in fields:
        if names is not None and f.name not in names:
            continue
        kwargs = argument_kwargs(hints[f.name])
        if "choices" not in kwargs and kwargs.get("action") is not argparse.BooleanOptionalAction:
            kwargs["metavar"] = f.name.upper()  # not the choices, which can be long (task names)
        if f.name in choices:
            kwargs["choices"] = tuple(choices[f.name])
        default = defaults.get(f.name, _default(f))
        help_ = help_text(docs.get(f.name, ""), default)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=help_, **kwargs)


def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def given(args: argparse.Namespace, names: Iterable[str]) -> dict:
    """The options among `names` that were given (not None): the keywords a command passes on."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends a hand-written option's default to its help, except None (unset: the API decides, and the
    help says what) and False (an off switch such as --no-progress)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Command(argparse.ArgumentParser):
    """A subcommand whose options are added when it is first used (parsed, or its help shown).

    Building the whole command line then imports only what the chosen command needs: the parser of
    `csrv2 encode` never imports the end-to-end trainer or the evaluation suite, whose configs make
    the options of `finetune` and `reproduce`.
    """

    def __init__(self, *args, add_options: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._add_options = add_options

    def complete(self) -> Command:
        """Add the options (once) and return the parser."""
        add, self._add_options = self._add_options, None
        if add is not None:
            add(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.complete()
        return super().format_usage()

    def format_help(self) -> str:
        self.complete()
        return super().format_help()


__all__ = ["Command", "HelpFormatter", "StoreTuple", "add_dataclass_options", "argument_kwargs", "field_names", "given", "help_text"]
