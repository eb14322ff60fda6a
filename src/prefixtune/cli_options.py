"""CLI options generated from the config dataclasses: each field is one `--option`, its help text the
field's help. The dataclasses stay the one source of truth for names, types, defaults and help."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Callable, Literal, Optional

import typer
from typer.core import TyperGroup
from typer.main import get_command_from_info
from typer.models import CommandInfo

from .config import ConfigError

# Older option names kept working (scripts use them); the help names them. The first name of each option
# is its field's name.
ALIASES = {"length": ["--prefix-length"], "time_budget_s": ["--time-budget"], "size": ["--adapter-size"],
           "torch_threads": ["--threads"], "request_timeout_s": ["--request-timeout"],
           "prefix_cache_bytes": ["--max-prefix-cache-bytes"], "store_poll_s": ["--store-poll"],
           "store_sweep_s": ["--store-sweep"], "eval_split": ["--split"]}
# An older name that only one command had stays that command's: `train` never had --split (there it would
# read as the training split), `evaluate` had it for the split it evaluates.
ALIAS_COMMAND = {"--split": "evaluate"}


def aliases(name: str, command: str | None = None) -> list[str]:
    """The older names of field `name`'s option in `command`."""
    return [a for a in ALIASES.get(name, []) if ALIAS_COMMAND.get(a, command) == command]


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


def fields_of(*classes, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """name -> {type, is_list, help, owners, default} over the CLI-visible fields of `classes` (default: the
    first owner's, dataclasses.MISSING when it has none: a required option), less the fields a command
    leaves out (`exclude`: set otherwise, e.g. train's data plan takes TrainConfig's seed)."""
    out: dict[str, dict] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True) is False or f.name in exclude:
                continue
            typ, is_list = _plain_type(hints[f.name])
            entry = out.setdefault(f.name, {"type": typ, "is_list": is_list, "help": [], "owners": [],
                                            "default": f.default})
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


def flag(name: str) -> str:
    """The option of field `name`: its name with dashes."""
    return "--" + name.replace("_", "-")


def options(fields: dict[str, dict], label=lambda cls: cls.__name__, show_defaults: bool = False,
            command: str | None = None) -> list[inspect.Parameter]:
    """typer options (default None = 'not given'; a field without a default is a required option) for
    `fields`, with their older names in `command`. Help texts are prefixed by their owners' labels (none when
    `label` gives ''); `show_defaults` adds the dataclass default to each."""
    params = []
    for name, entry in fields.items():
        olds = aliases(name, command)
        names = [f"{flag(name)}/--no-{name.replace('_', '-')}"] if entry["type"] is bool else [flag(name)]
        names += olds
        helps = entry["help"]
        text = " | ".join((f"({', '.join(label(c) for c in owners)}) " if label(owners[0]) else "") + h
                          for owners, h in helps)
        if entry["is_list"]:
            text += " (comma-separated)"
        if show_defaults and entry["default"] not in (dataclasses.MISSING, None):
            text += f" (default: {entry['default']})"
        if olds:
            text += f" ({', '.join(olds)}: its older name, still accepted.)"
        required = entry["default"] is dataclasses.MISSING
        annotation = entry["type"] if required else Optional[entry["type"]]
        extra = {"callback": _int_in_range(name)} if entry["type"] is int else {}
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(... if required else None, *names, help=text,
                                                             show_default=False, **extra)))
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
    """The options of `fields` that were given (a command's other options, and those not given, are left
    out); comma-separated lists become tuples."""
    out = {}
    for name, value in given.items():
        if value is None or name not in fields:
            continue
        if fields[name]["is_list"]:
            value = tuple(v.strip() for v in str(value).split(",") if v.strip())
        out[name] = value
    return out


def config_from(cls, given: dict[str, Any], base=None):
    """`cls` built from `base` (an instance; default: the class's defaults) with the options `given`. Its own
    checks decide what is valid; a ConfigError naming a field (`Cls.field: ...`) is told with its option."""
    values = dataclasses.asdict(base) if base is not None else {}
    values.update(given)
    try:
        return cls(**values)
    except ConfigError as e:
        raise told_with_its_option(e, cls) from None


def told_with_its_option(error: ConfigError, *classes) -> ConfigError:
    """`error` from one of `classes` (`Cls.field: ...`) with the option it came from in front: `--field: Cls.field: ...`."""
    named = [f.name for cls in classes for f in dataclasses.fields(cls) if str(error).startswith(f"{cls.__name__}.{f.name}:")]
    return ConfigError(f"{flag(named[0])}: {error}" if named else str(error))


# Commands whose options are generated only when they run (or show their own --help), from their command line:
# `train --method NAME --help` lists that method's options only; `prefixtune --help` builds none of them.
_LATER: dict[Callable, Callable[[], list[inspect.Parameter]]] = {}


def options_later(func, make_options):
    """Command `func` (with `**options` in its signature) gets the options `make_options(args)` returns when
    it is the command invoked (`args`: the command line after its name); until then, only its own parameters."""
    _LATER[func] = make_options
    return with_options(func, [])


class LaterOptionsGroup(TyperGroup):
    """A command group (`typer.Typer(cls=...)`) that gives an `options_later` command its options once it
    is the one invoked, rebuilding it from its completed signature."""

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        func = getattr(command.callback, "__wrapped__", None) if command is not None else None
        if func in _LATER:
            with_options(func, _LATER[func](list(rest)))
            del _LATER[func]  # the signature is complete now: later builds of the group read it as it is
            command = self.commands[name] = get_command_from_info(
                CommandInfo(name=name, callback=func), pretty_exceptions_short=False,
                rich_markup_mode=getattr(command, "rich_markup_mode", None))
        return name, command, rest
