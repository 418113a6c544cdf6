"""Command-line flags derived from a settings dataclass, so each setting is declared once.

A field `max_iters: int = 600` with `metadata={"help": "..."}` becomes `--max-iters N` (type from
the annotation, help from the metadata, default shown); a bool becomes `--X/--no-X`; `choices`
in the metadata restricts the value; `none` says what a None default means; a `list[int]` /
`list[str]` field takes comma-separated values (`--contexts 512,2048`), or, with `repeat` in the
metadata, one value per use of a repeatable flag (`--set a --set b`). TOML files are checked
against the same annotations (llmlab.validate.check_fields) and choices (check_choices).

Why a generator of ~90 lines instead of tyro / jsonargparse: llmlab's CLI rules (one `error:` line,
flags given override the TOML file, which overrides defaults, through argparse.SUPPRESS) stay in
plain argparse, and no dependency is added to the install or to CI.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

from llmlab.errors import LlmlabError


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text (and choices / what None means / metavar / repeat) next
    to it; a list default gets a fresh copy per instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def finite_float(text: str) -> float:
    value = float(text)  # argparse turns a ValueError into "invalid finite_float value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def base_type(tp: Any) -> tuple[type, bool]:
    """(the type, None allowed?) of an annotation: Optional[int] -> (int, True)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"only Optional[X] unions can be flags, got {tp}")
        return args[0], True
    return tp, False


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_text(f: dataclasses.Field) -> str:
    """What `--help` shows as a field's default (a None default's meaning comes from metadata)."""
    if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:  # a list
        value = f.default_factory()
        return ",".join(map(str, value)) if value else "none"
    if f.default is None:
        return f.metadata.get("none", "none")
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


_PARSE = {int: int, float: finite_float, str: str}
_METAVAR = {int: "N", float: "X", str: "TEXT"}


def comma_list(item: type):
    """argparse type of a comma-separated list of `item`s: "512,2048" -> [512, 2048]."""
    def parse(text: str) -> list:
        values = [_PARSE[item](v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
        return values
    parse.__name__ = f"comma-separated {item.__name__}"  # argparse names it in its error line
    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse prints a usage block and exits; llmlab's rule is one `error: ...` line, exit 2."""

    def error(self, message: str):
        raise LlmlabError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass `cls` (but those named in `skip`). Every field must carry a
    help text (a test checks)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = base_type(hints[f.name])
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text (metadata={{'help': ...}})")
        # argparse %-formats help strings: a literal % must be doubled
        text = f"{f.metadata['help']} (default: {default_text(f)})".replace("%", "%%")
        kw: dict[str, Any] = {"help": text}
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction  # --compile / --no-compile
        elif item in _PARSE and f.metadata.get("repeat"):  # --set a --set b -> [a, b]
            kw.update(action="append", type=_PARSE[item], metavar=f.metadata.get("metavar", _METAVAR[item]))
        elif item in _PARSE:  # --contexts 512,2048 -> [512, 2048]
            kw.update(type=comma_list(item), metavar=f.metadata.get("metavar", f"{_METAVAR[item]},..."))
        elif tp in _PARSE:
            kw["type"] = _PARSE[tp]
            kw["metavar"] = f.metadata.get("metavar", _METAVAR[tp])
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {tp}")
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
            kw.pop("metavar", None)  # argparse shows {a,b,c}
        parser.add_argument(flag_name(f.name), **kw)


def check_choices(obj: Any) -> None:
    """Values of fields with `choices` metadata must be one of them (flags check this at parsing;
    this covers TOML files, saved runs and Python callers)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "choices" in f.metadata and value is not None and value not in f.metadata["choices"]:
            raise LlmlabError(f"{flag_name(f.name)} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
