"""Config dataclasses described once: each field carries its help (and choices) in its metadata,
and the command-line flags of `tuneloop serve` and `tuneloop trainer` are generated from them."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any


def setting(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with its help text; a mutable default is copied per instance."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def field_type(cls: type, f: dataclasses.Field[Any]) -> Any:
    """The field's type with `| None` removed."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    fields: Iterable[dataclasses.Field[Any]] | None = None,
    dest_prefix: str = "",
) -> None:
    """One `--field-name` flag per field. Unset flags stay out of the namespace (SUPPRESS), so a
    later merge can tell "not given" from "given the default"."""
    for f in dataclasses.fields(cls) if fields is None else fields:
        typ = field_type(cls, f)
        # argparse %-formats help strings; help text is prose, so a literal "%" must survive.
        kw: dict[str, Any] = {"help": f.metadata.get("help", "").replace("%", "%%"), "default": argparse.SUPPRESS}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(typ) is list:
            kw.update(nargs="+", type=typing.get_args(typ)[0], metavar=f.name.upper())
        else:
            kw.update(type=typ, metavar=f.name.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), dest=dest_prefix + f.name, **kw)


def parse_value(typ: type, raw: Any) -> Any:
    """A value from a file or an environment variable as `typ`; raises ValueError."""
    if typ is bool and isinstance(raw, str):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    return typ(raw)
