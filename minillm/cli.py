"""Command-line flags from config dataclasses: every field becomes `--field-name`.

Scripts keep their settings in a dataclass (the single source of defaults and documentation) and
call `parse_config(Config)`. A field's help text comes from `field(metadata={"help": ...})`.
A boolean flag alone means true (`--tiny`); it also takes a value (`--shuffle false`), so that a
default of True can be turned off.
List fields take one or more values and may be repeated (`--prompt "a" --prompt "b"`).

Every script's parser is an `ArgumentParser` from here: flags are never abbreviated (argparse's
default would read `--max-step 5` as `--max-steps 5`), and a bad value or an unknown flag is one
`error:` line that points to --help, exit status 2, instead of the whole usage text.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser without prefix matching, whose errors are one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per field of dataclass `cls` to `parser`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = {"default": default, "help": f"{f.metadata.get('help', '')} (default: {default!r})"}
        origin = typing.get_origin(kind)
        args = typing.get_args(kind)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]  # Optional[X] -> X
            kind = inner[0] if len(inner) == 1 else str
            origin, args = typing.get_origin(kind), typing.get_args(kind)
        if kind is bool:
            kwargs.update(type=_parse_bool, metavar="BOOL", nargs="?", const=True)
        elif origin is list:
            # `--data a b --data c` gives [a, b, c]; argparse would extend the default list in
            # place, so the default is filled in by parse_config when the flag is absent.
            kwargs.update(type=args[0] if args else str, nargs="+", action="extend", default=None)
        elif kind in (int, float, str):
            kwargs["type"] = kind
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported flag type {kind}")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def _parser(cls, description: str | None) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description)
    add_dataclass_arguments(parser, cls)
    return parser


def given_fields(cls, argv: list[str] | None = None) -> set[str]:
    """Names of the fields of `cls` whose flags appear in `argv` (default: sys.argv), whatever
    their values: a resumed run keeps its saved settings except for these."""
    parser = _parser(cls, None)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """Parse `argv` (default: sys.argv) into an instance of dataclass `cls`."""
    parser = _parser(cls, description)
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None
              or typing.get_origin(typing.get_type_hints(cls)[k]) is not list}
    return cls(**values)
