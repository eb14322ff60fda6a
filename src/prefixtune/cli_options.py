"""CLI options generated from the config dataclasses: each field is one `--option`, its help text the
field's help. The dataclasses stay the one source of truth for names, types, defaults and help."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Literal, Optional

import typer

# Older option names kept working.
ALIASES = {"length": ["--prefix-length"], "time_budget_s": ["--time-budget"], "size": ["--adapter-size"]}


def _plain_type(hint) -> tuple[type, bool]:
    """(the CLI type, is it a comma-separated list) for a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _plain_type(args[0])
    if origin is Literal:
        return type(typing.get_args(hint)[0]), False
    if origin in (tuple, list):
        return str, True
    return hint, False


def fields_of(*classes) -> dict[str, dict]:
    """name -> {type, is_list, help, owners} over the CLI-visible fields of `classes`."""
    out: dict[str, dict] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True) is False:
                continue
            typ, is_list = _plain_type(hints[f.name])
            entry = out.setdefault(f.name, {"type": typ, "is_list": is_list, "help": [], "owners": []})
            entry["owners"].append(cls)
            text = f.metadata.get("help", "")
            for owners, known in entry["help"]:
                if known == text:
                    owners.append(cls)
                    break
            else:
                entry["help"].append(([cls], text))
    return out


INT_RANGES = {"seed": (0, 2**63 - 1)}  # torch, JSON and SQLite all hold these; 2**70 overflowed after the load
INT64 = (-(2**63), 2**63 - 1)


def _int_in_range(name: str):
    """A typer callback refusing an integer option outside its range (at parse time, before any work)."""
    low, high = INT_RANGES.get(name, INT64)

    def check(value):
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"{value} is out of range ({low} to {high})")
        return value

    return check


def options(fields: dict[str, dict], label=lambda cls: cls.__name__) -> list[inspect.Parameter]:
    """typer options (all default None = 'not given') for `fields`."""
    params = []
    for name, entry in fields.items():
        flag = "--" + name.replace("_", "-")
        names = [f"{flag}/--no-{name.replace('_', '-')}"] if entry["type"] is bool else [flag]
        names += ALIASES.get(name, [])
        helps = entry["help"]
        text = " | ".join(f"({', '.join(label(c) for c in owners)}) {h}" for owners, h in helps)
        if entry["is_list"]:
            text += " (comma-separated)"
        annotation = Optional[entry["type"]]
        extra = {"callback": _int_in_range(name)} if entry["type"] is int else {}
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(None, *names, help=text, show_default=False, **extra)))
    return params


def with_options(func, extra: list[inspect.Parameter]):
    """Give `func(**kwargs)` a signature = its own parameters + `extra` (typer reads the signature)."""
    own = [p for p in inspect.signature(func).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    hints = typing.get_type_hints(func)
    func.__signature__ = inspect.Signature(own + extra)
    func.__annotations__ = {**{p.name: hints.get(p.name, p.annotation) for p in own},
                            **{p.name: p.annotation for p in extra}}
    return func


def split_values(given: dict[str, Any], fields: dict[str, dict]) -> dict[str, Any]:
    """Drop options not given; comma-separated lists become tuples."""
    out = {}
    for name, value in given.items():
        if value is None:
            continue
        if fields.get(name, {}).get("is_list"):
            value = tuple(v.strip() for v in str(value).split(",") if v.strip())
        out[name] = value
    return out
