"""The method registry: `--method NAME` -> (config dataclass, module class), in one table.

Torch-free: an entry names the module its class lives in, and the class is imported on first use, so
the CLI reads every config class (train's options and their checks) without loading torch (start-up
time). `register(cls)` adds a method defined elsewhere, e.g. a third-party one, class in hand.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ..config import PrefixConfig
from . import configs

DEFAULT_METHOD = "prefix"  # what `prefixtune train` trains without --method: the paper's prefix-tuning


@dataclass(frozen=True)
class Registered:
    config_class: type
    where: str | type  # "module:Class" (imported on first use: torch), or the class itself once imported


_TABLE: dict[str, Registered] = {
    # name            config dataclass                 module class
    "prefix":      Registered(PrefixConfig, "prefix:PrefixModel"),
    "infix":       Registered(configs.InfixConfig, "infix:InfixModel"),
    "prompt":      Registered(configs.PromptConfig, "prompt:PromptModel"),
    "ptuning":     Registered(configs.PTuningConfig, "ptuning:PTuningModel"),
    "ptuning-v2":  Registered(configs.PTuningV2Config, "ptuning_v2:PTuningV2Model"),
    "finetune":    Registered(configs.FinetuneConfig, "finetune:FinetuneModel"),
    "ft-top":      Registered(configs.FtTopConfig, "ft_top:FtTopModel"),
    "adapter":     Registered(configs.AdapterConfig, "adapter:AdapterModel"),
    "lora":        Registered(configs.LoRAConfig, "lora:LoRAModel"),
    "ia3":         Registered(configs.IA3Config, "ia3:IA3Model"),
    "vpt":         Registered(configs.VPTConfig, "vpt:VPTModel"),
    "vpt-shallow": Registered(configs.VPTShallowConfig, "vpt:VPTShallowModel"),
    "vpt-deep":    Registered(configs.VPTDeepConfig, "vpt:VPTDeepModel"),
    "coop":        Registered(configs.CoOpConfig, "coop:CoOpModel"),
    "cocoop":      Registered(configs.CoCoOpConfig, "coop:CoCoOpModel"),
    "dapl":        Registered(configs.DAPLConfig, "coop:DAPLModel"),
    "l2p":         Registered(configs.L2PConfig, "l2p:L2PModel"),
}


def _load(name: str) -> type:
    entry = _TABLE[name]
    if not isinstance(entry.where, str):
        return entry.where
    module, _, class_name = entry.where.partition(":")
    cls = getattr(importlib.import_module(f".{module}", __package__), class_name)
    if cls.name != name or cls.config_class is not entry.config_class:  # the table and the class disagree
        raise TypeError(f"registry entry {name!r} -> {entry.where} is {cls.name!r} with "
                        f"{cls.config_class.__name__}, not {entry.config_class.__name__}")
    _TABLE[name] = Registered(entry.config_class, cls)
    return cls


class _Methods(Mapping):
    """name -> module class, in table order; a class (and torch) is imported when first looked up.
    Names and membership need no import."""

    def __getitem__(self, name: str) -> type:
        return _load(name)

    def __contains__(self, name) -> bool:
        return name in _TABLE

    def __iter__(self) -> Iterator[str]:
        return iter(list(_TABLE))

    def __len__(self) -> int:
        return len(_TABLE)

    def __repr__(self) -> str:
        return f"METHODS({', '.join(_TABLE)})"


METHODS = _Methods()


def register(cls: type) -> type:
    """Add a method class to the registry (usable as a decorator by third-party methods)."""
    _TABLE[cls.name] = Registered(cls.config_class, cls)
    return cls


def _known(name: str) -> str:
    key = name.lower()
    if key not in _TABLE:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(_TABLE)}")
    return key


def get_method(name: str) -> type:
    """The module class of method `name` (imports it, and torch)."""
    return _load(_known(name))


def config_class(name: str) -> type:
    """The config dataclass of method `name`, without importing its module (no torch)."""
    return _TABLE[_known(name)].config_class


def config_classes() -> dict[str, type]:
    """Every registered method's name -> config dataclass, in table order, without importing torch."""
    return {name: entry.config_class for name, entry in _TABLE.items()}
