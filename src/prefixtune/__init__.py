"""prefixtune: exact prefix-tuning and its soft-prompt family on frozen Hugging Face LMs."""

import importlib
import importlib.util

__version__ = "0.2.0"

# The public names, each loaded from its module on first use: importing any part of the package (the CLI
# on `prefixtune --help`, a config dataclass) should not pay for importing torch (start-up time).
_FROM = {
    "config": ["PrefixConfig"],
    "attention": ["RowPrefixes", "describe", "layout_of", "use_prefix"],
    "engine": ["forward_with_prefix", "generate_mixed", "generate_with_prefix"],
    "methods": ["METHODS", "InfixConfig", "InfixModel", "Method", "PrefixModel", "PromptConfig", "PromptModel",
                "PTuningConfig", "PTuningModel", "attach", "build", "get_method", "load_artifact", "save_artifact",
                "trainable_state"],
    "methods.weights": ["WeightArtifact"],
    "models": ["load_model"],
    "peft_io": ["export_peft", "import_peft"],
    "files": ["PrefixFileError"],
    "prefix": ["MergedPrefix", "Prefix", "load_prefix", "save_prefix"],
}
_MODULE_OF = {name: module for module, names in _FROM.items() for name in names}


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: pt.models, pt.methods, ...
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_MODULE_OF))


__all__ = [
    "PrefixConfig", "PrefixModel", "RowPrefixes", "MergedPrefix", "Prefix", "PrefixFileError",
    "forward_with_prefix", "generate_mixed", "generate_with_prefix", "layout_of", "describe", "trainable_state",
    "use_prefix", "load_model", "load_prefix", "save_prefix", "export_peft", "import_peft",
    "Method", "METHODS", "get_method", "build", "attach", "load_artifact", "save_artifact", "WeightArtifact",
    "InfixConfig", "InfixModel", "PromptConfig", "PromptModel", "PTuningConfig", "PTuningModel",
]
